"""chestssl: self-supervised pretraining and label-efficient fine-tuning for chest imaging."""

__version__ = "0.1.0"


def load_model(path, device: str = "auto"):
    """A fine-tuned model (run directory or ``model.safetensors``) ready to apply: ``load_model(p).predict(paths)``
    returns one :class:`chestssl.predict.Prediction` per input (see :mod:`chestssl.predict`)."""
    from chestssl.predict import load_model as _load

    return _load(path, device)
