"""Weights from PyTorch: the authors' (alinlab/cs-kd) and torchvision's state dicts, both ways.

`load_torch_state_dict(backbone, state_dict)` copies a PyTorch state dict into a registry
backbone, so a checkpoint trained with the authors' code (`torch.load("ckpt.t7")["net"]`) or a
torchvision model evaluates, fine-tunes or exports with cskd_tf. `torch_state_dict(backbone)`
is the inverse. The state dict is a plain `dict[str, numpy.ndarray]`, so PyTorch itself is not
needed here:

    state = torch.load("results/cifar100/CIFAR_ResNet18/0/ckpt.t7", map_location="cpu")["net"]
    state = {name: tensor.numpy() for name, tensor in state.items()}
    backbone = cskd_tf.backbones.get("preact_resnet18", 100, (32, 32, 3))
    cskd_tf.backbones.porting.load_torch_state_dict(backbone, state)

| cskd_tf backbone | PyTorch model |
|---|---|
| `preact_resnet10/18/34` | authors' `CIFAR_ResNet10/18/34` (`models/resnet.py`) |
| `resnet10/18/34/50/101` | authors' / torchvision's `resnet10/18/34/50/101` |
| `resnext101_32x4d` | `ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)` |
| `densenet121`, height <= 64 | authors' `CIFAR_DenseNet121` (`models/densenet3.py`) |
| `densenet121`, height > 64 | authors' / torchvision's `densenet121` (`models/densenet.py`) |

Every tensor is mapped, in the layout each framework uses:

- convolution `weight` (out, in / groups, kh, kw) <-> Keras `kernel` (kh, kw, in / groups, out);
- linear `weight` (out, in) <-> `kernel` (in, out), `bias` <-> `bias`;
- batch-norm `weight`, `bias`, `running_mean`, `running_var` <-> `gamma`, `beta`,
  `moving_mean`, `moving_variance`.

PyTorch's `num_batches_tracked` counters are ignored (batch-norm with a fixed momentum never
reads them), a `module.` prefix (the authors' checkpoints under `--ngpu > 1` are saved from a
`DataParallel`) is removed, and torchvision's old DenseNet names (`norm.1`, `conv.2`, ...) are
read as the new ones. Any other missing, extra or mis-shaped tensor is an error, raised before
any weight is changed.

The channel order of the concatenations needs no permutation: cskd_tf's 32x32 DenseNet
concatenates `[new, input]` as the authors' `torch.cat([out, x], 1)` does, and the 224x224 one
`[input, new]` as torchvision does.
"""

from __future__ import annotations

import re

import keras
import numpy as np

_BATCH_NORM = (
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
)
_IGNORED_SUFFIX = ".num_batches_tracked"
# torchvision's DenseNet checkpoints before 0.3 name `denselayer1.norm.1`, not `norm1`.
_OLD_DENSENET_NAME = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$"
)


def _preact_resnet_module(layer: str) -> str | None:
    # Authors' CIFAR_ResNet: conv1, bn1, layerS.I.{bn1,conv1,bn2,conv2,shortcut.0}, linear.
    if layer in ("conv1", "bn1"):
        return layer
    if layer == "logits":
        return "linear"
    match = re.fullmatch(r"layer(\d)_(\d+)_(bn1|conv1|bn2|conv2|shortcut)", layer)
    if match:
        stage, index, part = match.groups()
        return f"layer{stage}.{index}.{'shortcut.0' if part == 'shortcut' else part}"
    return None


def _resnet_module(layer: str) -> str | None:
    # torchvision ResNet / ResNeXt: conv1, bn1, layerS.I.{convK,bnK,downsample.{0,1}}, fc.
    if layer in ("conv1", "bn1"):
        return layer
    if layer == "logits":
        return "fc"
    match = re.fullmatch(
        r"layer(\d)_(\d+)_(conv[123]|bn[123]|downsample_conv|downsample_bn)", layer
    )
    if match:
        stage, index, part = match.groups()
        part = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(part, part)
        return f"layer{stage}.{index}.{part}"
    return None


def _densenet_module(layer: str) -> str | None:
    # torchvision DenseNet: features.{conv0,norm0,denseblockB.denselayerL.*,transitionB.*,norm5}.
    if layer == "logits":
        return "classifier"
    if layer in ("conv0", "norm0", "norm5"):
        return f"features.{layer}"
    match = re.fullmatch(r"denseblock(\d)_layer(\d+)_(norm1|conv1|norm2|conv2)", layer)
    if match:
        block, index, part = match.groups()
        return f"features.denseblock{block}.denselayer{index}.{part}"
    match = re.fullmatch(r"transition(\d)_(norm|conv)", layer)
    if match:
        return f"features.transition{match.group(1)}.{match.group(2)}"
    return None


def _cifar_densenet_module(layer: str) -> str | None:
    # Authors' CIFAR_DenseNet: conv1, denseB.(L-1).{bn1,conv1,bn2,conv2}, transB.{bn,conv}, bn.
    if layer == "logits":
        return "linear"
    if layer == "conv0":
        return "conv1"
    if layer == "norm5":
        return "bn"
    match = re.fullmatch(r"denseblock(\d)_layer(\d+)_(norm1|conv1|norm2|conv2)", layer)
    if match:
        block, index, part = match.groups()
        part = {"norm1": "bn1", "norm2": "bn2"}.get(part, part)
        return f"dense{block}.{int(index) - 1}.{part}"
    match = re.fullmatch(r"transition(\d)_(norm|conv)", layer)
    if match:
        return f"trans{match.group(1)}.{'bn' if match.group(2) == 'norm' else 'conv'}"
    return None


def _module_namer(backbone: keras.Model):
    name = backbone.name
    if name.startswith("preact_resnet"):
        return _preact_resnet_module
    if name.startswith(("resnet", "resnext")):
        return _resnet_module
    if name == "densenet121":
        layer_names = {layer.name for layer in backbone.layers}
        return _densenet_module if "norm0" in layer_names else _cifar_densenet_module
    raise ValueError(
        f"Backbone '{name}' has no PyTorch counterpart to port weights from; porting supports "
        "preact_resnet*, resnet*, resnext* and densenet121."
    )


def _to_keras(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # OIHW -> HWIO
        return np.transpose(array, (2, 3, 1, 0))
    if layout == "linear":  # (out, in) -> (in, out)
        return np.transpose(array)
    return array


def _to_torch(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":  # HWIO -> OIHW
        return np.transpose(array, (3, 2, 0, 1))
    if layout == "linear":
        return np.transpose(array)
    return array


def torch_names(backbone: keras.Model) -> list[tuple[str, keras.Variable, str]]:
    """Lists the PyTorch name of every weight of a backbone, in the backbone's layer order.

    Args:
        backbone: keras.Model. A registry backbone with a PyTorch counterpart (module docstring).

    Returns:
        list[tuple[str, keras.Variable, str]]. `(torch name, Keras variable, layout)`, where
        layout is `"conv"` (OIHW <-> HWIO), `"linear"` ((out, in) <-> (in, out)) or `"vector"`.

    Raises:
        ValueError: if the backbone has no PyTorch counterpart, or a layer with weights is not
            one the mapping knows.
    """
    module_name = _module_namer(backbone)
    entries = []
    for layer in backbone.layers:
        if not layer.weights:
            continue
        module = module_name(layer.name)
        if module is None:
            raise ValueError(
                f"Layer '{layer.name}' of backbone '{backbone.name}' has no PyTorch name in the "
                "porting map."
            )
        if isinstance(layer, keras.layers.BatchNormalization):
            entries += [(f"{module}.{t}", getattr(layer, k), "vector") for t, k in _BATCH_NORM]
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            layout = "conv" if isinstance(layer, keras.layers.Conv2D) else "linear"
            entries.append((f"{module}.weight", layer.kernel, layout))
            if layer.use_bias:
                entries.append((f"{module}.bias", layer.bias, "vector"))
        else:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) of backbone '{backbone.name}' "
                "holds weights the porting map does not know how to convert."
            )
    return entries


def _normalise_names(state_dict) -> dict[str, np.ndarray]:
    state = {}
    for name, value in state_dict.items():
        if name.endswith(_IGNORED_SUFFIX):
            continue
        if name.startswith("module."):
            name = name[len("module."):]
        old = _OLD_DENSENET_NAME.match(name)
        if old:
            name = old.group(1) + old.group(2)
        state[name] = np.asarray(value)
    return state


def _listing(names, limit: int = 3) -> str:
    names = sorted(names)
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_torch_state_dict(backbone: keras.Model, state_dict) -> None:
    """Copies a PyTorch state dict (authors' or torchvision names) into a registry backbone.

    Nothing is assigned unless every tensor matches: same names, no extra or missing one, and
    the shape of each after the layout change (see the module docstring) equals its Keras
    variable's. Values are cast to each variable's dtype.

    Args:
        backbone: keras.Model. Built by `cskd_tf.backbones.get` with the PyTorch model's
            number of classes (and, for `densenet121`, an input height on the same side of 64).
        state_dict: Mapping[str, array-like]. PyTorch names to NumPy arrays (or anything
            `numpy.asarray` takes), e.g. `{k: v.numpy() for k, v in net.state_dict().items()}`.

    Raises:
        ValueError: if the backbone has no PyTorch counterpart, or a tensor is missing, extra or
            of the wrong shape.
    """
    entries = torch_names(backbone)
    state = _normalise_names(state_dict)
    expected = {name for name, _, _ in entries}
    missing = expected - state.keys()
    if missing:
        raise ValueError(
            f"The state dict lacks {len(missing)} tensor(s) of backbone '{backbone.name}': "
            f"{_listing(missing)}."
        )
    extra = state.keys() - expected
    if extra:
        raise ValueError(
            f"The state dict has {len(extra)} tensor(s) that backbone '{backbone.name}' does not: "
            f"{_listing(extra)} (was it built with another architecture or stem?)."
        )
    values = []
    for name, variable, layout in entries:
        if state[name].ndim != len(variable.shape):
            value = state[name]  # Fails the shape check below, with PyTorch's shapes.
        else:
            value = _to_keras(state[name], layout)
        if tuple(value.shape) != tuple(variable.shape):
            wanted = _to_torch(np.empty(variable.shape, dtype=np.uint8), layout).shape
            raise ValueError(
                f"Tensor '{name}' has shape {tuple(state[name].shape)} where backbone "
                f"'{backbone.name}' needs {tuple(wanted)} (for its variable {variable.path})."
            )
        values.append(value)
    for (_, variable, _), value in zip(entries, values):
        variable.assign(value.astype(variable.dtype))


def torch_state_dict(backbone: keras.Model) -> dict[str, np.ndarray]:
    """Exports a registry backbone's weights as a PyTorch state dict of NumPy arrays.

    The inverse of `load_torch_state_dict`; `num_batches_tracked` is not produced (pass
    `strict=False` to `load_state_dict`, or add the counters).

    Args:
        backbone: keras.Model. A registry backbone with a PyTorch counterpart.

    Returns:
        dict[str, numpy.ndarray]. PyTorch names to arrays in PyTorch's layout, in the
        backbone's layer order.

    Raises:
        ValueError: if the backbone has no PyTorch counterpart.
    """
    return {
        name: _to_torch(keras.ops.convert_to_numpy(variable), layout)
        for name, variable, layout in torch_names(backbone)
    }
