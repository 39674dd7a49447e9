"""A trained model in use: the checkpoint format and its one owner (checkpoint.py), the one forward path for
every prediction with features, Grad-CAM and onnxruntime (predict.py), and the novelty scores (novelty.py)."""
