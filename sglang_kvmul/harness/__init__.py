"""Running real SGLang servers locally: the built-in tiny model, start/stop, the demo (tests, benchmarks)."""
