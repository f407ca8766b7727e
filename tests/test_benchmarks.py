"""The benchmark scripts in quick mode, from a fresh output folder: every case they promise is measured as
asked, the ratios are the ratios of the rows they name, the trained demo's served answers agree with timm's
own pipeline, the plots carry value labels, and smoke runs say so and recommend nothing."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from autotune import update_model_config
from conftest import DEMO_PREPROCESSING, REPO

from handler.config import HandlerConfig

BENCH = REPO / "bench"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Our served answers against timm's own eval pipeline on ImageNet-size photos (full decode on both sides,
# bicubic): measured max top-5 score shift 0.0003 over the quick run's 16 photos, 0.0019 over 24 in
# tests/test_engine.py. A wrong mean/std or interpolation shifts scores by several hundredths.
MAX_TOP5_SHIFT_IMAGENET = 0.005


def run_script(name: str, *args: str, timeout: float = 240, returncode: int = 0) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=REPO, capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == returncode, (
        f"{name} exited with {completed.returncode}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return completed


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000


def assert_smoke_run(stdout: str) -> None:
    """A quick run says, first and last, that it is a smoke run whose numbers recommend nothing."""
    lines = stdout.strip().splitlines()
    for line in (lines[0], lines[-1]):
        assert "SMOKE RUN" in line and "recommend nothing" in line, line


def assert_labels_show(labels: list[str], values: list[float]) -> None:
    """One label per bar, each the bar's value to 3 significant digits."""
    shown = sorted(float(label) for label in labels)
    assert shown == pytest.approx(sorted(values), rel=0.006, abs=0.006), (labels, values)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    """Our archive and the stock one, from the demo's weights, built once for this module."""
    store = tmp_path_factory.mktemp("model_store")
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_mar.py"), "--stock", "--export-path", str(store)],
                   check=True, capture_output=True, timeout=300)
    return store


def test_bench_preprocess_quick(tmp_path):
    completed = run_script("bench_preprocess.py", "--quick", "--out", str(tmp_path))
    assert_smoke_run(completed.stdout)
    result = json.loads((tmp_path / "bench_preprocess.json").read_text())
    assert result["quick"] is True
    demo = {key: list(value) if isinstance(value, tuple) else value for key, value in DEMO_PREPROCESSING.items()}
    assert result["preprocessing"] == demo

    rows = result["results"]
    methods = [("stock", 0), ("stock", 1), ("recipe", 2), ("ours", 1), ("ours", 2)]  # what --quick promises
    expected = {(set_name, 8, method, param) for set_name in ("imagenet", "phone") for method, param in methods}
    assert sorted((r["set"], r["batch"], r["method"], r["param"]) for r in rows) == sorted(expected)
    for row in rows:
        assert row["n"] == 2, row
        assert 0 < row["min_s"] <= row["p25_s"] <= row["median_s"] <= row["p75_s"] <= row["max_s"], row
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["median_s"])

    assert {(e["set"], e["batch"]) for e in result["speedups"]} == {("imagenet", 8), ("phone", 8)}
    for entry in result["speedups"]:
        cell = {r["label"]: r for r in rows if (r["set"], r["batch"]) == (entry["set"], entry["batch"])}
        for key, method in (("ours_best", "ours"), ("best_stock", "stock"), ("best_recipe", "recipe")):
            named = cell[entry[key]]
            assert named["method"] == method
            assert named["images_per_s"] == max(r["images_per_s"] for r in cell.values() if r["method"] == method)
        ours = cell[entry["ours_best"]]["images_per_s"]
        assert entry["ours_over_stock"] == pytest.approx(ours / cell[entry["best_stock"]]["images_per_s"])
        assert entry["ours_over_best_recipe"] == pytest.approx(ours / cell[entry["best_recipe"]]["images_per_s"])

    # Inputs against timm's own eval transform, in pixel levels. The stock method runs the same float ops on
    # the same full decode (measured 0); ours on ImageNet-size photos is a full decode too (measured max 1
    # level, the uint8 rounding); 12 MP photos are decoded at a reduced DCT scale (measured mean 0.23).
    agreement = {entry["set"]: entry for entry in result["input_agreement"]}
    assert set(agreement) == {"imagenet", "phone"}
    assert all(entry["images"] == 8 for entry in agreement.values())
    assert all(entry["stock_max_abs_diff_levels"] < 0.01 for entry in agreement.values())
    assert agreement["imagenet"]["max_abs_diff_levels"] <= 2
    assert agreement["imagenet"]["mean_abs_diff_levels"] <= 0.01
    assert agreement["phone"]["mean_abs_diff_levels"] <= 1

    assert_labels_show(result["plot_labels"], [row["images_per_s"] for row in rows])
    assert_png(tmp_path / "bench_preprocess.png")


@pytest.mark.e2e
def test_bench_serve_quick(tmp_path, archives):
    completed = run_script("bench_serve.py", "--quick", "--out", str(tmp_path), "--model-store", str(archives),
                           timeout=900)
    assert_smoke_run(completed.stdout)
    result = json.loads((tmp_path / "bench_serve.json").read_text())
    assert result["quick"] is True and result["model"] == "timm:tf_efficientnet_lite0"

    rows = result["results"]
    methods = ("ours", "ours_oip", "ours_grpc", "ours_one_per_request", "stock")  # --quick: 8 per request, 2 clients
    assert sorted((r["set"], r["method"], r["images_per_request"], r["concurrency"]) for r in rows) == \
           sorted(("imagenet", method, 8, 2) for method in methods)
    for row in rows:
        assert row["errors"] == 0, row
        assert row["requests"] == row["requested"] == 2, row
        assert row["images"] == row["requests"] * row["images_per_request"]
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
        assert row["images_per_s"] == pytest.approx(row["images"] / row["wall_s"])
    by_method = {row["method"]: row for row in rows}

    [alone] = result["model_alone"]
    assert alone["batch"] == 8
    assert alone["images_per_s"] == pytest.approx(alone["batch"] / alone["median_s"])

    [summary] = result["summary"]
    ours = max((by_method[m] for m in methods if m != "stock"), key=lambda r: r["images_per_s"])
    assert (summary["ours_method"], summary["ours_concurrency"]) == (ours["method"], ours["concurrency"])
    assert summary["ours_over_stock"] == pytest.approx(ours["images_per_s"] / by_method["stock"]["images_per_s"])
    assert summary["ours_of_model_alone"] == pytest.approx(ours["images_per_s"] / alone["images_per_s"])

    [times] = result["request_times"]  # the table: one request of N images, ours both ways and stock
    stock_ms = by_method["stock"]["p50_ms"]
    for method in ("ours", "ours_oip", "ours_grpc", "ours_one_per_request"):
        assert times[f"{method}_p50_ms"] == by_method[method]["p50_ms"]
        assert times[f"{method}_speedup"] == pytest.approx(stock_ms / by_method[method]["p50_ms"])
    assert times["model_alone_ms"] == pytest.approx(1e3 * 8 / alone["images_per_s"])
    assert "stock/ours (1 req)" in completed.stdout and "stock/ours (N req)" in completed.stdout
    assert "stock/ours (1 gRPC)" in completed.stdout

    accuracy = {entry["set"]: entry for entry in result["accuracy"]}
    assert set(accuracy) == {"imagenet", "mixed"}
    imagenet = accuracy["imagenet"]
    assert imagenet["images"] == 16
    assert imagenet["top1_agreement"] == 1.0 and imagenet["top5_set_agreement"] == 1.0
    assert 0 <= imagenet["median_top5_shift"] <= imagenet["max_top5_shift"] <= MAX_TOP5_SHIFT_IMAGENET
    assert accuracy["mixed"]["top1_agreement"] == 1.0

    labels = result["plot_labels"]
    ceiling_labels = [label for label in labels if "model alone" in label]
    assert len(ceiling_labels) == 2  # the model-alone line, labelled on both panels
    assert_labels_show([label for label in labels if label not in ceiling_labels],
                       [row["images_per_s"] for row in rows] + [row["p50_ms"] for row in rows])
    assert_png(tmp_path / "bench_serve.png")


def test_every_bench_serve_method_names_a_way_of_sending_it_knows():
    import bench_serve

    methods = [*bench_serve.METHODS, bench_serve.step_method("eager:fp32")]
    assert {method.transport for method in methods} == set(bench_serve.TRANSPORTS)
    assert all(method.transport in bench_serve.TRANSPORTS for method in methods)


def test_autotune_quick_is_a_smoke_run_that_chooses_nothing(tmp_path, archives):
    completed = run_script("autotune.py", "--quick", "--mar", str(archives / "efficientnet_lite0.mar"),
                           "--out", str(tmp_path))
    assert_smoke_run(completed.stdout)
    assert "settings to use" not in completed.stdout and "chosen" not in completed.stdout
    result = json.loads((tmp_path / "autotune.json").read_text())
    assert result["quick"] is True and "best" not in result and "model_config" not in result
    rows = result["results"]
    assert sorted((r["workers"], r["decode_threads"], r["max_batch"]) for r in rows) == [(1, 1, 4), (1, 2, 4)]
    for row in rows:
        assert row["requests"] == 1
        assert 0 < row["p50_ms"] <= row["p95_ms"]


def test_autotune_refuses_to_write_settings_from_a_smoke_run(tmp_path, archives):
    config = tmp_path / "model-config.yaml"
    shutil.copy(REPO / "model-config.yaml", config)
    completed = run_script("autotune.py", "--quick", "--mar", str(archives / "efficientnet_lite0.mar"),
                           "--out", str(tmp_path), "--write", str(config), returncode=2)
    assert "--write cannot be used with --quick" in completed.stderr
    assert config.read_text() == (REPO / "model-config.yaml").read_text()
    assert not (tmp_path / "autotune.json").exists()


def test_autotune_writes_the_chosen_settings(tmp_path, archives):
    """A real (if tiny) sweep: the chosen setting is the fastest within the bound, and it is what gets written."""
    config = tmp_path / "model-config.yaml"
    shutil.copy(REPO / "model-config.yaml", config)
    completed = run_script("autotune.py", "--mar", str(archives / "efficientnet_lite0.mar"), "--out", str(tmp_path),
                           "--decode-threads", "1", "2", "--max-batch", "2", "4", "--images-per-request", "4",
                           "--backends", "eager", "openvino", "--precisions", "fp32",
                           "--requests", "1", "--latency-bound-ms", "60000", "--write", str(config))
    assert "SMOKE RUN" not in completed.stdout and "settings to use" in completed.stdout
    result = json.loads((tmp_path / "autotune.json").read_text())
    rows, best = result["results"], result["best"]
    assert len(rows) == 8 and best in rows
    assert sorted({(row["backend"], row["served"]) for row in rows}) == [("eager", "eager fp32"),
                                                                          ("openvino", "openvino fp32")]
    assert best["images_per_s"] > max(row["images_per_s"] for row in rows) - 0.1  # a tie within 0.1 takes fewer threads
    written = yaml.safe_load(config.read_text())
    assert [written["handler"][key] for key in ("decode_threads", "max_batch", "backend", "precision")] == \
           [best[key] for key in ("decode_threads", "max_batch", "backend", "precision")]
    assert written["minWorkers"] == written["maxWorkers"] == best["workers"]
    assert "# images per model forward" in config.read_text()  # the rest of the file, comments included, stays
    HandlerConfig.from_model_yaml(written)


def test_bench_model_step_quick_times_each_step_and_checks_its_answers(tmp_path):
    completed = run_script("bench_model_step.py", "--quick", "--models", "demo", "--backends", "eager", "openvino",
                           "--out", str(tmp_path))
    assert_smoke_run(completed.stdout)
    result = json.loads((tmp_path / "bench_model_step.json").read_text())
    assert result["quick"] is True and "cpu_flags" in result and isinstance(result["native_bf16"], bool)
    rows = {row["step"]: row for row in result["results"]}
    assert set(rows) >= {"eager fp32 NCHW", "eager fp32 channels_last (old default)", "openvino fp32"}
    assert rows["eager fp32 channels_last (old default)"]["over_old_default"] == 1.0
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["median_ms"] / 1e3))
        assert row["photos"] == 8
    assert rows["openvino fp32"]["top1"] == 1.0 and rows["openvino fp32"]["max_top5_shift"] <= 1e-3


def test_update_model_config_keeps_comments_and_other_settings():
    text = "minWorkers: 1\nmaxWorkers: 1  # cores shared\nhandler:\n  crop_size: 224\n  max_batch: 32  # per forward\n"
    updated = update_model_config(text, {"maxWorkers": 2}, {"max_batch": 16, "decode_threads": 1})
    assert "maxWorkers: 2  # cores shared" in updated
    assert "max_batch: 16  # per forward" in updated
    values = yaml.safe_load(updated)
    assert values["minWorkers"] == 1
    assert values["handler"] == {"crop_size": 224, "max_batch": 16, "decode_threads": 1}


@pytest.mark.e2e
def test_bench_transport_quick_answers_every_request_in_every_format(tmp_path, archives):
    completed = run_script("bench_transport.py", "--quick", "--out", str(tmp_path), "--model-store", str(archives))
    assert "SMOKE RUN" in completed.stdout and "recommend nothing" in completed.stdout
    assert "the client's default takes" not in completed.stdout  # a smoke run draws no conclusions
    result = json.loads((tmp_path / "bench_transport.json").read_text())
    assert result["quick"] is True
    rows = result["results"]
    formats = {"raw", "multipart", "json", "oip-json", "oip-binary", "grpc", "client"}
    for set_name in ("imagenet", "phone"):
        mine = [row for row in rows if row["set"] == set_name]
        assert {row["format"] for row in mine} == formats
        assert {(row["format"], row["requests"]) for row in mine if row["format"] != "client"} == \
               {(fmt, n) for fmt in formats - {"client", "raw"} for n in (1, 8)} | {("raw", 8)}
    for row in rows:
        assert row["images"] == 8 and row["rounds"] == 2
        assert row["answered"] == row["expected"] == 16, row  # every image of every request got its entry
        assert 0 < row["p25_ms"] <= row["median_ms"] <= row["p75_ms"]
        assert row["mb_per_s"] == pytest.approx(row["megabytes"] / (row["median_ms"] / 1e3), rel=1e-6)
    assert {(h["set"], h["images"]) for h in result["handler"]} == {("imagenet", 8), ("phone", 8)}
    assert all(h["handler_ms"] >= h["model_ms"] > 0 for h in result["handler"])
    for entry in result["summary"]:
        client = next(r for r in rows if r["set"] == entry["set"] and r["format"] == "client")
        multipart = next(r for r in rows if r["set"] == entry["set"] and r["format"] == "multipart"
                         and r["requests"] == 1)
        assert entry["client_over_multipart"] == pytest.approx(client["median_ms"] / multipart["median_ms"])
        assert entry["limit"] in ("handler", "transport")
    assert_png(tmp_path / "bench_transport.png")
