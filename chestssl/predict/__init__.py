"""Applying fine-tuned models to new scans (``chestssl predict``) and exporting them (``chestssl export``).

``chestssl.load_model(path).predict(paths)`` is the same in Python.
"""

from chestssl.predict.run import Prediction, Predictor, load_model, predict_to_folder

__all__ = ["Prediction", "Predictor", "load_model", "predict_to_folder"]
