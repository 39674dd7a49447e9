"""Training a model: the loop (loop.py), the optimizer and schedules (optimization.py), a run's files
(runs.py), torchrun (distributed.py), what --other and the rotation head add (outliers.py), what is fitted after
training (posthoc.py), and what train.py says (report.py)."""
