"""bench/gpu_check.py must start on a bare GPU machine: torch, torchvision, numpy and Pillow only."""

import gpu_check


def test_the_modules_gpu_check_uses_import_without_the_projects_other_dependencies():
    """Imports the engine and the script's helpers in a child process where matplotlib, tqdm, scikit-image,
    requests, psutil, yaml, jsonschema, pytest and TorchServe cannot be imported."""
    result = gpu_check.check_light_imports()
    assert result["status"] == "passed", result


def test_the_engine_never_imports_torchserve():
    result = gpu_check.check_torchserve_free()
    assert result["status"] == "passed", result


def test_a_deadline_too_short_to_finish_still_writes_the_report_and_prints_the_summary(tmp_path):
    """The watchdog ends the run while a check is running: exit 0 (nothing failed), the JSON says where it stopped,
    every check it never reached is skipped with the reason, and the summary is on stdout."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(gpu_check.REPO / "bench" / "gpu_check.py"), "--quick", "--deadline",
                           "3"], capture_output=True, text=True, timeout=120, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("gpu_check-*.json")).read_text())
    assert report["cut_short"]["after_s"] >= 3
    assert set(report["checks"]) >= {"timings", "parity", "stream_race", "compile"}
    assert all(check["status"] == "skipped" and check["reason"].startswith("deadline")
               for name, check in report["checks"].items() if name in ("timings", "parity", "compile"))
    assert "== summary ==" in done.stdout and "deadline of 3 s reached" in done.stdout


def test_the_summary_names_every_key_figure():
    report = {"checks": {
        "parity": {"status": "passed", "min_embedding_cosine": 0.9991, "max_probability_shift": 0.01,
                   "same_top1": "9/9", "decoder": "nvjpeg"},
        "stream_race": gpu_check.inconclusive("the control corrupted nothing", race_reproduced_by_control=False),
        "compile": {"status": "passed", "compile_seconds_per_bucket": {1: 40.0, 32: 61.5}}},
        "timings": [{"set": "baseline 500x375", "method": "(d) engine, device decode", "images": 32, "p50_ms": 40.0,
                     "images_per_s": 800.0}], "summary": {"passed": 2}}
    text = "\n".join(gpu_check.summary_lines(report))
    for figure in ("(d) 800.0 img/s, p50 40.0 ms", "0.99910", "0.0100", "9/9", "stream race: inconclusive",
                   "control reproduced the race: False", "1: 40.0 s, 32: 61.5 s"):
        assert figure in text, figure
