"""cskd_tf: class-wise self-knowledge distillation (CS-KD) for Keras.

Yun et al., "Regularizing Class-wise Predictions via Self-knowledge
Distillation", CVPR 2020.

The public names are imported on first use, so that `python -m cskd_tf.train
--help` and flag errors answer without waiting for TensorFlow to import.
"""

import importlib

__version__ = "0.2.0"

_PUBLIC = {
    "CSKDModel": "cskd_tf.model",
    "DDGSDModel": "cskd_tf.ddgsd",
    "BYOTModel": "cskd_tf.byot",
    "CoupledWeightDecaySGD": "cskd_tf.optim",
    "step_schedule": "cskd_tf.optim",
    "class_wise_kl": "cskd_tf.losses",
    "EvaluationCallback": "cskd_tf.callbacks",
    "pair_dataset": "cskd_tf.data.pairs",
}
_SUBMODULES = (
    "backbones",
    "byot",
    "callbacks",
    "checkpointing",
    "data",
    "ddgsd",
    "export",
    "figures",
    "losses",
    "metrics",
    "model",
    "optim",
    "paper",
    "report",
    "saving",
    "sweep",
)
__all__ = sorted([*_PUBLIC, *_SUBMODULES])


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"cskd_tf.{name}")
    raise AttributeError(f"module 'cskd_tf' has no attribute '{name}'")
