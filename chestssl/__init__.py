"""chestssl: self-supervised pretraining and label-efficient fine-tuning for chest imaging."""

__version__ = "0.1.0"
