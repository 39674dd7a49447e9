"""A trained model in use: the checkpoint format and its one owner (checkpoint.py), the one forward path for
every prediction with features, Grad-CAM and onnxruntime (predict.py), the novelty scores (novelty.py), INT8
models (quantize.py), and Classifier, the object your own code predicts with (classifier.py):

    from prediction import Classifier
    clf = Classifier.load("models/best_model.pth")
    clf.predict("photo.jpg")
"""
from prediction.classifier import Classifier, Prediction

__all__ = ["Classifier", "Prediction"]
