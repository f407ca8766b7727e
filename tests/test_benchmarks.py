"""The benchmark scripts run from a fresh output folder in quick mode and write a table, JSON and PNG."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from autotune import update_model_config
from conftest import REPO

from handler.config import HandlerConfig

SCRIPTS = REPO / "scripts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=REPO, capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == 0, f"{name} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000


def assert_rows(rows: list[dict], keys: set[str]) -> None:
    assert rows, "no result rows"
    for row in rows:
        assert keys <= set(row), keys - set(row)
        assert row["images_per_s"] > 0


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    """Our archive and the stock one, from the same weights, built once for this module."""
    store = tmp_path_factory.mktemp("model_store")
    subprocess.run([sys.executable, str(SCRIPTS / "build_mar.py"), "--stock", "--export-path", str(store)],
                   check=True, capture_output=True, timeout=300)
    return store


def test_bench_preprocess_quick(tmp_path):
    completed = run_script("bench_preprocess.py", "--quick", "--out", str(tmp_path))
    assert "ours/stock" in completed.stdout
    result = json.loads((tmp_path / "bench_preprocess.json").read_text())
    assert {"machine", "device", "settings", "results", "speedups", "input_agreement"} <= set(result)
    assert_rows(result["results"], {"set", "batch", "method", "median_s", "p25_s", "p75_s", "n"})
    assert {row["method"] for row in result["results"]} == {"stock", "recipe", "ours"}
    assert all(entry["ours_over_stock"] > 0 for entry in result["speedups"])
    assert all(entry["max_abs_diff_levels"] >= 0 for entry in result["input_agreement"])
    assert_png(tmp_path / "bench_preprocess.png")


@pytest.mark.e2e
def test_bench_serve_quick(tmp_path, archives):
    completed = run_script("bench_serve.py", "--quick", "--out", str(tmp_path), "--model-store", str(archives))
    assert "images/s" in completed.stdout
    result = json.loads((tmp_path / "bench_serve.json").read_text())
    assert {"machine", "model_alone", "results", "summary", "accuracy"} <= set(result)
    assert_rows(result["results"], {"set", "model", "images_per_request", "concurrency", "p50_ms", "p95_ms",
                                    "p99_ms", "errors"})
    assert {row["model"] for row in result["results"]} == {"resnet50", "resnet50_fanout", "resnet50_stock"}
    assert {entry["ours_transport"] for entry in result["summary"]} <= {"multipart", "one image per request"}
    assert all(row["errors"] == 0 for row in result["results"])
    assert result["model_alone"][0]["images_per_s"] > 0
    assert all(0 <= entry["top1_agreement"] <= 1 for entry in result["accuracy"])
    assert_png(tmp_path / "bench_serve.png")


def test_autotune_quick_prints_and_writes_settings(tmp_path, archives):
    config = tmp_path / "model-config.yaml"
    shutil.copy(REPO / "model-config.yaml", config)
    completed = run_script("autotune.py", "--quick", "--mar", str(archives / "resnet50.mar"),
                           "--out", str(tmp_path), "--write", str(config))
    assert "handler:" in completed.stdout and "chosen:" in completed.stdout
    result = json.loads((tmp_path / "autotune.json").read_text())
    assert_rows(result["results"], {"workers", "decode_threads", "max_batch", "p95_ms"})
    written = yaml.safe_load(config.read_text())
    assert written["handler"]["decode_threads"] == result["best"]["decode_threads"]
    assert written["handler"]["max_batch"] == result["best"]["max_batch"]
    HandlerConfig.from_model_yaml(written)


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
