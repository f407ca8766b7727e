"""What the tests (and the benchmarks) run against: a private TorchServe (``ts_server``), independent reference
pipelines (``reference``), hostile and awkward inputs (``hostile``), client traffic while scaling (``traffic``), a
simulated CUDA device (``simulated_device``) and the pipeline measured on it (``measure_pipeline``)."""
