"""Backbone registry: `get(name, num_classes, input_shape)` builds a fresh functional model.

Every backbone is a functional `keras.Model` named after its registry name, taking normalised
NHWC float images and returning float32 logits `[batch, num_classes]` from a final dense layer
named `logits`. The layer just before it is named `features` (`FEATURES_LAYER`) and outputs the
pooled penultimate features `[batch, D]`, which recall@1 and the t-SNE analysis of the paper
(section 3.3) use; `feature_model` exposes both outputs.

| name | family | input | D |
|---|---|---|---|
| `preact_resnet10/18/34` | authors' CIFAR PreAct ResNet, 3x3 stem | 32x32 | 512 |
| `resnet10/18/34` | torchvision ResNet, basic blocks, 7x7 stem | 224x224 | 512 |
| `resnet50/101` | torchvision ResNet v1.5, bottleneck blocks | 224x224 | 2048 |
| `resnext101_32x4d` | torchvision ResNeXt, bottleneck blocks, 32 groups | 224x224 | 2048 |
| `densenet121` | DenseNet-BC; 3x3 stem if height <= 64, else 7x7 | any | 1024 |
| `small_convnet` | 3 convolutions with batch-norm (offline demo) | 8x8 | 64 |
| `mlp` | 2 dense layers, no batch-norm (replica tests) | any | 64 |
"""

from __future__ import annotations

from typing import Callable

import keras

from cskd_tf.backbones import densenet, preact_resnet, resnet, small

FEATURES_LAYER = "features"

_REGISTRY: dict[str, Callable[[int, tuple[int, int, int]], keras.Model]] = {
    "densenet121": densenet.densenet121,
    "mlp": small.mlp,
    "preact_resnet10": preact_resnet.preact_resnet10,
    "preact_resnet18": preact_resnet.preact_resnet18,
    "preact_resnet34": preact_resnet.preact_resnet34,
    "resnet10": resnet.resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnext101_32x4d": resnet.resnext101_32x4d,
    "small_convnet": small.small_convnet,
}


def names() -> list[str]:
    """Lists the registered backbone names.

    Returns:
        list[str]. The names `get` accepts, sorted.
    """
    return sorted(_REGISTRY)


def get(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """Builds a freshly initialised backbone.

    Args:
        name: str. A registered name (see `names()`).
        num_classes: int. Width of the logits.
        input_shape: tuple[int, int, int]. (height, width, channels) of the normalised images.

    Returns:
        keras.Model. Functional model named `name`, images -> float32 logits.

    Raises:
        ValueError: if `name` is not registered, or the other arguments are malformed.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown backbone '{name}'. Choose one of: {', '.join(names())}.")
    return _REGISTRY[name](num_classes, input_shape)


def feature_model(backbone: keras.Model) -> keras.Model:
    """Wraps a backbone so that it returns both its logits and its pooled features.

    The new model shares the backbone's layers and weights; nothing is copied.

    Args:
        backbone: keras.Model. A functional model with a layer named `FEATURES_LAYER`.

    Returns:
        keras.Model. Same inputs; outputs `[logits, features]`.

    Raises:
        ValueError: if `backbone` has no layer named `FEATURES_LAYER`.
    """
    try:
        features = backbone.get_layer(FEATURES_LAYER).output
    except ValueError as error:
        raise ValueError(
            f"Backbone '{backbone.name}' has no layer named '{FEATURES_LAYER}', so its features "
            "cannot be exposed."
        ) from error
    return keras.Model(
        backbone.input, [backbone.output, features], name=f"{backbone.name}_features"
    )
