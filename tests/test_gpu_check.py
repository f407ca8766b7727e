"""scripts/gpu_check.py must start on a bare GPU machine: torch, torchvision, numpy and Pillow only."""

import gpu_check


def test_the_modules_gpu_check_uses_import_without_the_projects_other_dependencies():
    """Imports the engine and the script's helpers in a child process where matplotlib, tqdm, scikit-image,
    requests, psutil, yaml, jsonschema, pytest and TorchServe cannot be imported."""
    result = gpu_check.check_light_imports()
    assert result["status"] == "passed", result


def test_the_engine_never_imports_torchserve():
    result = gpu_check.check_torchserve_free()
    assert result["status"] == "passed", result
