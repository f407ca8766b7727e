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
        ({"precision": "int8"}, "precision must be one of fp32, fp16, bf16"),
        ({"batch_buckets": [8, 1]}, "batch_buckets must be strictly increasing"),
        ({"batch_buckets": [1, 8], "max_batch": 32}, "largest batch bucket must be at least max_batch"),
        ({"topk": 0}, "topk must be between 1 and num_classes"),
        ({"max_batch": "32"}, "max_batch must be a whole number"),
        ({"pin_memory": "yes"}, "pin_memory must be true or false"),
        ({"max_batch": True}, "max_batch must be a whole number"),
        ({"allowed_formats": []}, "allowed_formats must name at least one format"),
        ({"resize": 256}, "unknown handler setting(s): resize"),
        ({"dataloader_start_method": "thread"}, "dataloader_start_method must be one of forkserver, spawn, fork"),
    ],
)
def test_invalid_settings_are_rejected_with_a_helpful_message(settings, message):
    with pytest.raises(ConfigError) as error:
        HandlerConfig.from_mapping(settings)
    assert message in str(error.value)


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
