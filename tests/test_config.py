import os

import pytest

from handler.config import ConfigError, HandlerConfig, available_cpus


def test_defaults_are_valid_imagenet_settings():
    config = HandlerConfig()
    assert (config.resize_size, config.crop_size, config.topk) == (256, 224, 5)
    assert config.decode_strategy == "threads"


def test_from_model_yaml_reads_handler_section_and_max_workers():
    config = HandlerConfig.from_model_yaml(
        {"maxWorkers": 2, "batchSize": 8, "handler": {"max_batch": 16, "mean": [0.5, 0.5, 0.5], "cpu_count": 8}}
    )
    assert config.max_batch == 16
    assert config.mean == (0.5, 0.5, 0.5)
    assert config.max_workers == 2
    assert config.pool_size == 4 and config.intra_op_threads == 4


def test_pool_size_never_oversubscribes_and_explicit_values_win():
    assert HandlerConfig(cpu_count=2, max_workers=3).pool_size == 1
    assert HandlerConfig(cpu_count=16, max_workers=1, decode_threads=3).pool_size == 3


def test_missing_handler_section_gives_defaults():
    assert HandlerConfig.from_model_yaml(None) == HandlerConfig.from_model_yaml({})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_batch": 0}, "max_batch must be greater than 0"),
        ({"decode_strategy": "processes"}, "decode_strategy must be one of threads, dataloader, inline"),
        ({"crop_size": 300}, "resize_size (256) must be at least crop_size (300)"),
        ({"std": [0.2, 0.0, 0.2]}, "every std value must be greater than 0"),
        ({"mean": [0.5, 0.5]}, "mean and std must each have 3 values"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"precision": "int8"}, "precision must be one of auto, fp32, bf16, fp16"),
        ({"backend": "tensorrt"}, "backend must be one of auto, eager, inductor, openvino"),
        ({"compile": True}, "'compile' was replaced by 'backend': write backend: inductor"),
        ({"batch_buckets": [8, 1]}, "batch_buckets must be strictly increasing"),
        ({"batch_buckets": [1, 8], "max_batch": 32}, "largest batch bucket must be at least max_batch"),
        ({"topk": 0}, "topk must be between 1 and num_classes"),
        ({"max_batch": "32"}, "max_batch must be a whole number"),
        ({"pin_memory": "yes"}, "pin_memory must be true or false"),
        ({"max_batch": True}, "max_batch must be a whole number"),
        ({"allowed_formats": []}, "allowed_formats must name at least one format"),
        ({"resize": 256}, "unknown handler setting(s): resize"),
        ({"dataloader_start_method": "thread"}, "dataloader_start_method must be one of forkserver, spawn, fork"),
        ({"chunks_per_request": 0}, "chunks_per_request must be 1 (no split) or more"),
        ({"chunks_per_request": 1.5}, "chunks_per_request must be a whole number"),
    ],
)
def test_invalid_settings_are_rejected_with_a_helpful_message(settings, message):
    with pytest.raises(ConfigError) as error:
        HandlerConfig.from_mapping(settings)
    assert message in str(error.value)


def test_chunks_per_request_defaults_to_two_and_is_read_from_yaml():
    assert HandlerConfig().chunks_per_request == 2
    assert HandlerConfig.from_model_yaml({"handler": {"chunks_per_request": 1}}).chunks_per_request == 1


def test_handler_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        HandlerConfig.from_model_yaml({"handler": [1, 2]})


def test_config_is_immutable():
    config = HandlerConfig()
    with pytest.raises(AttributeError):
        config.max_batch = 3  # type: ignore[misc]


@pytest.mark.parametrize(("cpu_max", "affinity", "expected"), [
    ("150000 100000\n", 8, 2),    # a pod limited to 1.5 CPUs on an 8-core node: rounded up to 2
    ("400000 100000\n", 8, 4),
    ("100000 100000\n", 16, 1),
    ("800000 100000\n", 2, 2),    # a quota above the affinity: the affinity wins
    ("max 100000\n", 8, 8),        # no quota
    ("garbage\n", 8, 8),           # unreadable: the affinity is the limit
])
def test_available_cpus_respects_a_container_quota(tmp_path, cpu_max, affinity, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert available_cpus(tmp_path / "cpu.max", affinity=affinity) == expected


def test_available_cpus_without_a_quota_file_is_this_process_affinity(tmp_path):
    assert available_cpus(tmp_path / "missing") == len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "missing", affinity=6) == 6


# --- Boundaries: the smallest valid value is accepted, the one below it refused ---------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"crop_size": 0}, "crop_size must be a positive number of pixels"),
    ({"dataloader_batch_size": 0}, "dataloader_batch_size must be greater than 0"),
    ({"decode_device": "tpu"}, "decode_device must be one of auto, cpu, cuda; got 'tpu'"),
    ({"batch_buckets": [0, 8, 32]}, "every batch bucket must be greater than 0"),
    ({"torch_threads": -1}, "torch_threads must be 0 (automatic) or a positive number"),
    ({"decode_threads": -1}, "decode_threads must be 0 (automatic) or a positive number"),
    ({"dataloader_workers": -1}, "dataloader_workers must be 0 or more"),
    ({"max_images_per_request": 0}, "max_images_per_request must be greater than 0"),
    ({"max_image_bytes": 0}, "max_image_bytes must be greater than 0"),
    ({"max_image_pixels": 0}, "max_image_pixels must be greater than 0"),
    ({"max_workers": 0}, "max_workers must be greater than 0"),
    ({"topk": 11, "num_classes": 10}, "topk must be between 1 and num_classes (10)"),
    ({"draft_margin": 0.99}, "draft_margin must be at least 1.0"),
    ({"interpolation": "nearest"}, "interpolation must be one of bilinear, bicubic; got 'nearest'"),
])
def test_values_just_outside_the_valid_range_are_rejected(settings, message):
    with pytest.raises(ConfigError) as error:
        HandlerConfig.from_mapping(settings)
    assert message in str(error.value)


@pytest.mark.parametrize("settings", [
    {"crop_size": 1, "resize_size": 1},
    {"dataloader_batch_size": 1},
    {"dataloader_workers": 0},
    {"max_batch": 1},
    {"max_batch": 1, "batch_buckets": [1]},
    {"decode_device": "cpu"},
    {"decode_device": "cuda"},
    {"torch_threads": 0},
    {"torch_threads": 1},
    {"decode_threads": 0},
    {"topk": 1},
    {"topk": 10, "num_classes": 10},
    {"max_images_per_request": 1},
    {"max_image_bytes": 1},
    {"max_image_pixels": 1},
    {"max_workers": 1},
    {"draft_margin": 1.0},
    {"resize_size": 224, "crop_size": 224},
    {"allowed_formats": ["JPEG"]},
])
def test_the_smallest_valid_values_are_accepted(settings):
    config = HandlerConfig.from_mapping(settings)
    for name, value in settings.items():
        assert getattr(config, name) == (tuple(value) if isinstance(value, list) else value)


# --- YAML values and their types ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(1.5, 1.5), (3, 3.0)])
def test_a_float_setting_takes_a_number_from_yaml(value, expected):
    config = HandlerConfig.from_mapping({"draft_margin": value})
    assert config.draft_margin == expected
    assert type(config.draft_margin) is float


@pytest.mark.parametrize(("settings", "message"), [
    ({"draft_margin": "2.0"}, "draft_margin must be a number; got '2.0'"),
    ({"draft_margin": True}, "draft_margin must be a number; got True"),
    ({"draft_margin": None}, "draft_margin must be a number; got None"),
    ({"device": 1}, "device must be a string; got 1"),
    ({"architecture": None}, "architecture must be a string; got None"),
    ({"mean": [0.5, "0.5", 0.5]}, "mean must be a list of numbers; got [0.5, '0.5', 0.5]"),
    ({"std": [0.5, True, 0.5]}, "std must be a list of numbers"),
    ({"std": [0.5, None, 0.5]}, "std must be a list of numbers"),
    ({"batch_buckets": [1, 8.0, 32]}, "batch_buckets must be a list of whole numbers; got [1, 8.0, 32]"),
    ({"batch_buckets": [1, True]}, "batch_buckets must be a list of whole numbers"),
    ({"batch_buckets": ["1", "8"]}, "batch_buckets must be a list of whole numbers"),
    ({"batch_buckets": 8}, "batch_buckets must be a list; got 8"),
    ({"mean": 0.5}, "mean must be a list; got 0.5"),
    ({"allowed_formats": "JPEG"}, "allowed_formats must be a list; got 'JPEG'"),
    ({"allowed_formats": ["JPEG", 1]}, "allowed_formats must be a list of format names such as JPEG"),
    ({"allowed_formats": ["png", None]}, "allowed_formats must be a list of format names such as JPEG"),
    ({"max_batch": 8.0}, "max_batch must be a whole number; got 8.0"),
    ({"cpu_count": "4"}, "cpu_count must be a whole number"),
])
def test_yaml_values_of_the_wrong_type_are_rejected(settings, message):
    with pytest.raises(ConfigError) as error:
        HandlerConfig.from_mapping(settings)
    assert message in str(error.value)


def test_lists_from_yaml_become_tuples_of_the_right_type():
    config = HandlerConfig.from_mapping({"mean": [0, 1, 0.5], "std": [1, 0.25, 2], "batch_buckets": [1, 4, 32]})
    assert config.mean == (0.0, 1.0, 0.5) and all(type(v) is float for v in config.mean)
    assert config.std == (1.0, 0.25, 2.0) and all(type(v) is float for v in config.std)
    assert config.batch_buckets == (1, 4, 32)


def test_allowed_formats_from_yaml_are_upper_cased():
    config = HandlerConfig.from_mapping({"allowed_formats": ["jpeg", "Png", "WEBP"]})
    assert config.allowed_formats == ("JPEG", "PNG", "WEBP")


def test_unknown_settings_are_all_named_with_the_known_ones():
    with pytest.raises(ConfigError) as error:
        HandlerConfig.from_mapping({"resize": 256, "batch": 8, "max_batch": 8})
    message = str(error.value)
    assert "unknown handler setting(s): batch, resize;" in message
    assert "known settings: allowed_formats, architecture," in message
    assert "max_batch" in message.split("known settings:")[1]


def test_an_explicit_handler_max_workers_wins_over_max_workers():
    config = HandlerConfig.from_model_yaml({"maxWorkers": 4, "handler": {"max_workers": 2, "cpu_count": 8}})
    assert config.max_workers == 2
    assert config.pool_size == 4


def test_max_workers_alone_sets_the_handler_value():
    assert HandlerConfig.from_model_yaml({"maxWorkers": 3}).max_workers == 3
    assert HandlerConfig.from_model_yaml({"handler": {"topk": 3}}).max_workers == 1


# --- available_cpus on other machines (faked affinity, quota and platform) -----------------------------------------


def test_available_cpus_counts_the_affinity_not_the_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cpus(tmp_path / "missing") == 3


def test_available_cpus_without_sched_getaffinity_uses_cpu_count(tmp_path, monkeypatch):
    """macOS and Windows have no sched_getaffinity."""
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cpus(tmp_path / "missing") == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    assert available_cpus(tmp_path / "missing") == 1


@pytest.mark.parametrize(("cpu_max", "affinity", "expected"), [
    ("50000 100000\n", 8, 1),     # half a CPU: still one decode thread, not zero
    ("1000 100000\n", 8, 1),      # a hundredth of a CPU
    ("100001 100000\n", 8, 2),    # just over one CPU: rounded up
    ("200000 100000\n", 1, 1),    # one core in the affinity: the quota cannot add cores
    ("300000 200000\n", 8, 2),    # a period other than 100 ms
])
def test_available_cpus_rounds_a_small_quota_up_to_whole_cpus(tmp_path, cpu_max, affinity, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert available_cpus(tmp_path / "cpu.max", affinity=affinity) == expected


def test_available_cpus_applies_the_quota_to_the_faked_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert available_cpus(tmp_path / "cpu.max") == 4
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path / "cpu.max") == 12
