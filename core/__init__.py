"""What every other module uses and which imports none of them: the user-error type, devices and precision,
atomic writes, provenance of figures (common.py); accuracy, calibration and losses on tensors (metrics.py); the
PNG plots (plots.py)."""
