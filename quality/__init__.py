"""What is wrong with a dataset: the data report and quarantine (audit.py), likely label errors from out-of-fold
predictions (label_errors.py)."""
