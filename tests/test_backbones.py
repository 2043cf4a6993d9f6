"""Tests for cskd_tf.backbones: known parameter counts, PyTorch shapes, padding and initialisers."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from cskd_tf import backbones
from cskd_tf.backbones import layers

# ---------------------------------------------------------------------------------------------
# Expected parameter counts.
#
# PyTorch's `sum(p.numel() for p in model.parameters())` counts weights, biases and batch-norm
# gamma/beta; the running mean/variance are buffers and are not counted. Keras stores the moving
# mean/variance as non-trainable weights instead, so PyTorch's count equals the Keras trainable
# count exactly, and the Keras non-trainable count is 2 per batch-norm channel (asserted apart).
# ---------------------------------------------------------------------------------------------

# Published torchvision counts (num_classes=1000).
TORCHVISION_RESNET18 = 11_689_512
TORCHVISION_RESNET34 = 21_797_672
TORCHVISION_RESNET50 = 25_557_032
TORCHVISION_RESNET101 = 44_549_160
TORCHVISION_DENSENET121 = 7_978_856
# torchvision's documented ResNeXt counts; it ships no ResNeXt-101 32x4d (the paper's Table 5).
TORCHVISION_RESNEXT50_32X4D = 25_028_904
TORCHVISION_RESNEXT101_32X8D = 88_791_336
TORCHVISION_RESNEXT101_64X4D = 83_455_272

WIDTHS = (64, 128, 256, 512)


def _identity_basic_block(w: int) -> int:
    """Parameters of a basic block that keeps width w: two 3x3 convs and two BNs (gamma, beta).

    The same count holds for the post-activation (torchvision) and pre-activation blocks.
    """
    return 2 * (3 * 3 * w * w) + 2 * (2 * w)


# PreAct ResNet-18 on CIFAR-100, by hand from the authors' CIFAR_ResNet:
PREACT18_CIFAR100 = (
    3 * 3 * 3 * 64
    + 2 * 64  # stem conv3x3(3->64), bn1
    # layer1: two identity blocks at width 64
    + 2 * (2 * 64 + 3 * 3 * 64 * 64 + 2 * 64 + 3 * 3 * 64 * 64)
    # layer2: block0 = bn1(64) + conv(64->128) + bn2(128) + conv(128->128) + 1x1 shortcut(64->128)
    + (2 * 64 + 3 * 3 * 64 * 128 + 2 * 128 + 3 * 3 * 128 * 128 + 64 * 128)
    + (2 * 128 + 3 * 3 * 128 * 128 + 2 * 128 + 3 * 3 * 128 * 128)
    # layer3
    + (2 * 128 + 3 * 3 * 128 * 256 + 2 * 256 + 3 * 3 * 256 * 256 + 128 * 256)
    + (2 * 256 + 3 * 3 * 256 * 256 + 2 * 256 + 3 * 3 * 256 * 256)
    # layer4
    + (2 * 256 + 3 * 3 * 256 * 512 + 2 * 512 + 3 * 3 * 512 * 512 + 256 * 512)
    + (2 * 512 + 3 * 3 * 512 * 512 + 2 * 512 + 3 * 3 * 512 * 512)
    + 512 * 100
    + 100  # linear
)
# = 11,217,444. Cross-check: Kuang Liu's PreActResNet18 (no stem BN) on CIFAR-10 is the widely
# quoted 11,171,146 = 11,217,444 - 2 * 64 - (512 * 100 + 100) + (512 * 10 + 10).
assert PREACT18_CIFAR100 == 11_217_444
assert PREACT18_CIFAR100 - 2 * 64 - (512 * 100 + 100) + (512 * 10 + 10) == 11_171_146

# [1,1,1,1] drops one identity block per stage; [3,4,6,3] adds (1,2,4,1) of them.
_ONE_PER_STAGE = sum(_identity_basic_block(w) for w in WIDTHS)  # 6,270,720
_EXTRA_34 = sum(n * _identity_basic_block(w) for n, w in zip((1, 2, 4, 1), WIDTHS))  # 10,108,160
PREACT10_CIFAR100 = PREACT18_CIFAR100 - _ONE_PER_STAGE
PREACT34_CIFAR100 = PREACT18_CIFAR100 + _EXTRA_34
RESNET10_IMAGENET = TORCHVISION_RESNET18 - _ONE_PER_STAGE
# torchvision's own resnet34 count confirms the identity-block arithmetic.
assert TORCHVISION_RESNET18 + _EXTRA_34 == TORCHVISION_RESNET34



def _bottleneck_resnet(blocks, groups: int = 1, width_per_group: int = 64, classes: int = 1000):
    """Parameters of torchvision's `ResNet(Bottleneck, blocks, groups, width_per_group)`, by hand.

    Stem conv7x7(3->64) + bn1; per block: conv1 1x1 (in->w), bn1, grouped conv2 3x3 (w->w, so
    9 * (w / groups) * w weights), bn2, conv3 1x1 (w->4p), bn3, plus the 1x1 downsample and its
    BN on the first block of each stage; fc 2048->classes with bias. w = int(p * wpg / 64) * g.
    """
    total = 7 * 7 * 3 * 64 + 2 * 64
    in_channels = 64
    for planes, num_blocks in zip(WIDTHS, blocks):
        width = int(planes * width_per_group / 64) * groups
        out = 4 * planes
        for index in range(num_blocks):
            total += in_channels * width + 2 * width
            total += 3 * 3 * (width // groups) * width + 2 * width
            total += width * out + 2 * out
            if index == 0:  # stride or channels change: downsample conv + BN
                total += in_channels * out + 2 * out
            in_channels = out
    return total + 2048 * classes + classes


# The formula reproduces every published torchvision bottleneck count, groups 1 and 32/64 ...
assert _bottleneck_resnet((3, 4, 6, 3)) == TORCHVISION_RESNET50
assert _bottleneck_resnet((3, 4, 23, 3)) == TORCHVISION_RESNET101
assert _bottleneck_resnet((3, 4, 6, 3), 32, 4) == TORCHVISION_RESNEXT50_32X4D
assert _bottleneck_resnet((3, 4, 23, 3), 32, 8) == TORCHVISION_RESNEXT101_32X8D
assert _bottleneck_resnet((3, 4, 23, 3), 64, 4) == TORCHVISION_RESNEXT101_64X4D
# ... so it gives torchvision's `ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)`.
RESNEXT101_32X4D_IMAGENET = _bottleneck_resnet((3, 4, 23, 3), 32, 4)
assert RESNEXT101_32X4D_IMAGENET == 44_177_704

# DenseNet-121 with the 3x3 stem (authors' CIFAR_DenseNet121) on CIFAR-100: torchvision's model
# minus the 7x7 stem conv and norm0 (gamma, beta), plus a 3x3 stem conv, with a 100-way head.
DENSENET121_CIFAR100 = (
    TORCHVISION_DENSENET121
    - 7 * 7 * 3 * 64
    - 2 * 64
    + 3 * 3 * 3 * 64
    - (1024 * 1000 + 1000)
    + (1024 * 100 + 100)
)

# small_convnet on 8x8x1 digits: three bias-free convs, three BNs, a 64->10 dense layer.
SMALL_CONVNET_DIGITS = (
    3 * 3 * 1 * 32 + 2 * 32 + 3 * 3 * 32 * 64 + 2 * 64 + 3 * 3 * 64 * 64 + 2 * 64 + 64 * 10 + 10
)
MLP_DIGITS = (64 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10)

# name, input shape, classes, expected PyTorch parameter count, features width.
CASES = [
    ("resnet18", (224, 224, 3), 1000, TORCHVISION_RESNET18, 512),
    ("resnet10", (64, 64, 3), 1000, RESNET10_IMAGENET, 512),
    ("resnet34", (64, 64, 3), 1000, TORCHVISION_RESNET34, 512),
    ("resnet50", (64, 64, 3), 1000, TORCHVISION_RESNET50, 2048),
    ("resnet101", (64, 64, 3), 1000, TORCHVISION_RESNET101, 2048),
    ("resnext101_32x4d", (64, 64, 3), 1000, RESNEXT101_32X4D_IMAGENET, 2048),
    ("densenet121", (224, 224, 3), 1000, TORCHVISION_DENSENET121, 1024),
    ("densenet121", (32, 32, 3), 100, DENSENET121_CIFAR100, 1024),
    ("preact_resnet18", (32, 32, 3), 100, PREACT18_CIFAR100, 512),
    ("preact_resnet10", (32, 32, 3), 100, PREACT10_CIFAR100, 512),
    ("preact_resnet34", (32, 32, 3), 100, PREACT34_CIFAR100, 512),
    ("small_convnet", (8, 8, 1), 10, SMALL_CONVNET_DIGITS, 64),
    ("mlp", (8, 8, 1), 10, MLP_DIGITS, 64),
]

_MODELS: dict[tuple, keras.Model] = {}


def _build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Builds a backbone once per test session; several tests inspect the same big models."""
    key = (name, input_shape, num_classes)
    if key not in _MODELS:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)  # reproducible draws for the initialiser statistics
        _MODELS[key] = backbones.get(name, num_classes, input_shape)
    return _MODELS[key]


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _MODELS.clear()
    keras.backend.clear_session()


def _count(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)


def _case_id(case) -> str:
    return f"{case[0]}-{case[1][0]}"


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------


def test_names_lists_required_backbones_sorted():
    required = {
        "preact_resnet18",
        "preact_resnet10",
        "resnet18",
        "resnet10",
        "resnet50",
        "resnet101",
        "densenet121",
        "small_convnet",
        "mlp",
    }
    assert required <= set(backbones.names())
    assert backbones.names() == sorted(backbones.names())


def test_unknown_name_raises_with_choices():
    with pytest.raises(ValueError) as info:
        backbones.get("resnet9000", 10, (32, 32, 3))
    message = str(info.value)
    assert message.startswith("Unknown backbone 'resnet9000'. Choose one of: ")
    for name in backbones.names():
        assert name in message


@pytest.mark.parametrize(
    "num_classes, input_shape", [(0, (8, 8, 1)), (10, (8, 8)), (10, (0, 8, 1))]
)
def test_malformed_arguments_raise(num_classes, input_shape):
    with pytest.raises(ValueError, match="small_convnet"):
        backbones.get("small_convnet", num_classes, input_shape)


# ---------------------------------------------------------------------------------------------
# Parameter counts, output shapes and layer conventions of every backbone.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parameter_count_matches_pytorch(case):
    name, input_shape, num_classes, expected, _ = case
    model = _build(name, input_shape, num_classes)
    assert _count(model.trainable_weights) == expected
    # Keras' extra non-trainable weights are exactly the BN moving mean and variance.
    bn_layers = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    bn_channels = sum(l.gamma.shape[0] for l in bn_layers)
    assert _count(model.non_trainable_weights) == 2 * bn_channels


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_logits_and_features_shapes(case):
    name, input_shape, num_classes, _, width = case
    model = _build(name, input_shape, num_classes)
    assert model.name == name
    assert model.layers[-1].name == "logits"
    assert model.layers[-2].name == backbones.FEATURES_LAYER
    assert model.get_layer("logits").input is model.get_layer("features").output
    assert tuple(model.get_layer("features").output.shape) == (None, width)
    x = np.random.default_rng(0).normal(size=(2,) + input_shape).astype("float32")
    logits = model(x, training=False)
    assert tuple(logits.shape) == (2, num_classes)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_batch_norm_and_bias_conventions(case):
    name, input_shape, num_classes, _, _ = case
    model = _build(name, input_shape, num_classes)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.momentum == 0.9 and layer.epsilon == 1e-5, layer.name
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.gamma), 1.0)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.beta), 0.0)
        if isinstance(layer, keras.layers.Conv2D):
            # No convolution of the reference ResNets / DenseNets has a bias.
            assert not layer.use_bias, layer.name
    assert model.get_layer("logits").use_bias


# ---------------------------------------------------------------------------------------------
# Spatial shapes follow PyTorch's floor((H + 2p - k) / s) + 1.
# ---------------------------------------------------------------------------------------------


def _torch_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _spatial(model: keras.Model, layer: str) -> tuple[int, int]:
    return tuple(model.get_layer(layer).output.shape[1:3])


@pytest.mark.parametrize("size", [224, 64, 100])
def test_resnet18_spatial_shapes(size):
    model = (
        _build("resnet18", (size, size, 3), 1000)
        if size == 224
        else backbones.get("resnet18", 1000, (size, size, 3))
    )
    h = _torch_out(_torch_out(size, 7, 2, 3), 3, 2, 1)  # conv1, maxpool
    assert _spatial(model, "maxpool") == (h, h)
    assert _spatial(model, "layer1_1_out") == (h, h)
    for stage in (2, 3, 4):
        h = _torch_out(h, 3, 2, 1)
        assert _spatial(model, f"layer{stage}_1_out") == (h, h)
    expected_final = {224: 7, 64: 2, 100: 4}[size]
    assert h == expected_final
    assert _spatial(model, "layer4_1_out") == (expected_final, expected_final)
    if size == 224:
        assert _spatial(model, "maxpool") == (56, 56)


def test_resnet50_widths_and_shapes():
    model = _build("resnet50", (64, 64, 3), 1000)
    assert tuple(model.get_layer("layer1_2_out").output.shape) == (None, 16, 16, 256)
    assert tuple(model.get_layer("layer2_0_conv2").output.shape) == (None, 8, 8, 128)  # v1.5
    assert tuple(model.get_layer("layer2_0_conv1").output.shape) == (None, 16, 16, 128)
    assert tuple(model.get_layer("layer4_2_out").output.shape) == (None, 2, 2, 2048)


def test_resnext101_32x4d_widths_groups_and_shapes():
    model = _build("resnext101_32x4d", (64, 64, 3), 1000)
    # Stage of p planes: width int(p * 4 / 64) * 32 = 2p, output 4p; 23 blocks in layer3.
    for stage, (planes, size) in enumerate(zip(WIDTHS, (16, 8, 4, 2)), 1):
        width = 2 * planes
        last = (3, 4, 23, 3)[stage - 1] - 1
        block = f"layer{stage}_{last}"
        assert model.get_layer(f"{block}_conv1").kernel.shape == (1, 1, 4 * planes, width)
        conv2 = model.get_layer(f"{block}_conv2")
        assert conv2.groups == 32
        # Keras' grouped kernel is HWIO with I = in_channels / groups: 4 channels per group per
        # 64 planes ("32x4d"), 4/8/16/32 in the four stages.
        assert conv2.kernel.shape == (3, 3, width // 32, width) and width // 32 == planes // 16
        assert model.get_layer(f"{block}_conv3").kernel.shape == (1, 1, width, 4 * planes)
        assert tuple(model.get_layer(f"{block}_out").output.shape) == (
            None, size, size, 4 * planes
        )  # fmt: skip
    # The stride is on the grouped 3x3 convolution, as in ResNet v1.5.
    assert tuple(model.get_layer("layer2_0_conv1").output.shape) == (None, 16, 16, 256)
    assert tuple(model.get_layer("layer2_0_conv2").output.shape) == (None, 8, 8, 256)
    assert model.get_layer("layer2_0_downsample_conv").kernel.shape == (1, 1, 256, 512)
    # Only the 3x3 convolutions of the blocks are grouped.
    grouped = [l.name for l in model.layers if getattr(l, "groups", 1) != 1]
    assert len(grouped) == 3 + 4 + 23 + 3
    assert all(name.endswith("_conv2") for name in grouped)


def test_resnext_init():
    model = _build("resnext101_32x4d", (64, 64, 3), 1000)
    kernel = _np(model.get_layer("layer4_1_conv2").kernel)
    # kaiming_normal_(mode="fan_out") of a grouped weight [1024, 32, 3, 3]: PyTorch's fan_out is
    # 1024 * 3 * 3 (size(0) times the receptive field, groups not divided out), as Keras' of
    # the HWIO kernel (3, 3, 32, 1024).
    assert kernel.shape == (3, 3, 32, 1024)
    assert kernel.std() == pytest.approx(math.sqrt(2.0 / (9 * 1024)), rel=0.01)
    assert np.abs(kernel).max() > 4 * kernel.std()
    logits = model.get_layer("logits")
    bound = 1.0 / math.sqrt(2048)  # fc at nn.Linear's defaults
    assert _max_abs_within(_np(logits.kernel), bound)
    assert _np(logits.kernel).std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert _max_abs_within(_np(logits.bias), bound)
    assert np.abs(_np(logits.bias)).max() > bound / 2


def test_basic_blocks_refuse_groups():
    from cskd_tf.backbones import resnet  # pylint: disable=g-import-not-at-top

    with pytest.raises(ValueError, match="basic blocks support only groups=1"):
        resnet.resnet("basic", (1, 1, 1, 1), 10, (32, 32, 3), name="resnext10", groups=32)


def test_preact_resnet18_structure():
    model = _build("preact_resnet18", (32, 32, 3), 100)
    assert _spatial(model, "relu1") == (32, 32)
    for stage, size in zip((1, 2, 3, 4), (32, 16, 8, 4)):
        assert _spatial(model, f"layer{stage}_1_add") == (size, size)
    # Projection shortcuts only where the shape changes, on the pre-activated input, no BN.
    shortcuts = [l.name for l in model.layers if l.name.endswith("_shortcut")]
    assert shortcuts == ["layer2_0_shortcut", "layer3_0_shortcut", "layer4_0_shortcut"]
    for name in shortcuts:
        block = name[: -len("_shortcut")]
        assert model.get_layer(name).input is model.get_layer(f"{block}_relu1").output
    # The authors' identity shortcut (`self.shortcut(out)` with an empty nn.Sequential) also
    # carries the pre-activated input, not the block input.
    for block in ("layer1_0", "layer1_1", "layer2_1", "layer3_1", "layer4_1"):
        add_inputs = model.get_layer(f"{block}_add").input
        assert add_inputs[1] is model.get_layer(f"{block}_relu1").output
    # The reference pools the raw sum of the last block: no final BN-ReLU.
    assert model.get_layer("features").input is model.get_layer("layer4_1_add").output


def test_densenet121_stems():
    big = _build("densenet121", (224, 224, 3), 1000)
    assert _spatial(big, "pool0") == (56, 56)
    for index, size in zip((1, 2, 3), (28, 14, 7)):
        assert _spatial(big, f"transition{index}_pool") == (size, size)
    assert tuple(big.get_layer("relu5").output.shape) == (None, 7, 7, 1024)

    small = _build("densenet121", (32, 32, 3), 100)
    layer_names = {l.name for l in small.layers}
    assert "norm0" not in layer_names and "pool0" not in layer_names
    assert small.get_layer("conv0").kernel.shape == (3, 3, 3, 64)
    # 64 + 6 * 32 = 256 -> 128; 128 + 12 * 32 = 512 -> 256; 256 + 24 * 32 = 1024 -> 512;
    # 512 + 16 * 32 = 1024.
    expected = {1: (16, 128), 2: (8, 256), 3: (4, 512)}
    for index, (size, channels) in expected.items():
        shape = tuple(small.get_layer(f"transition{index}_pool").output.shape)
        assert shape == (None, size, size, channels)
    assert tuple(small.get_layer("relu5").output.shape) == (None, 4, 4, 1024)


@pytest.mark.slow
def test_densenet121_stem_threshold():
    # 64 is the largest height that still gets the 3x3 stem; 65 gets the 7x7 one.
    assert backbones.get("densenet121", 10, (64, 64, 3)).get_layer("conv0").kernel.shape[0] == 3
    keras.backend.clear_session()
    assert backbones.get("densenet121", 10, (65, 65, 3)).get_layer("conv0").kernel.shape[0] == 7


# ---------------------------------------------------------------------------------------------
# Padding is aligned like PyTorch's, compared with a numpy reference.
# ---------------------------------------------------------------------------------------------


def _torch_conv2d(x: np.ndarray, kernel: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """torch.nn.functional.conv2d semantics in NHWC: symmetric zero padding, cross-correlation."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw = kernel.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]), dtype=np.float64)
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, kernel)
    return out


def _torch_max_pool(x: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
    """torch.nn.functional.max_pool2d semantics in NHWC: -inf padding."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
    ho = (x.shape[1] - kernel) // stride + 1
    wo = (x.shape[2] - kernel) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for i in range(ho):
        for j in range(wo):
            window = x[:, i * stride : i * stride + kernel, j * stride : j * stride + kernel, :]
            out[:, i, j, :] = window.max(axis=(1, 2))
    return out


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [(8, 3, 2, 1), (9, 3, 2, 1), (10, 7, 2, 3), (11, 7, 2, 3), (8, 3, 1, 1), (8, 1, 2, 0)],
)
def test_conv2d_matches_torch_padding(size, kernel, stride, padding):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, size, size, 3)).astype("float32")
    inputs = keras.Input((size, size, 3))
    outputs = layers.conv2d(
        inputs,
        4,
        kernel,
        stride=stride,
        padding=padding,
        name="conv",
        kernel_initializer=layers.torch_default_kernel_initializer(),
    )
    model = keras.Model(inputs, outputs)
    weights = model.get_layer("conv").kernel
    expected = _torch_conv2d(x, keras.ops.convert_to_numpy(weights), stride, padding)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "groups, kernel, stride, padding",
    [(4, 3, 1, 1), (4, 3, 2, 1), (32, 3, 2, 1), (32, 3, 1, 1), (2, 1, 2, 0)],
)
def test_grouped_conv2d_is_the_concatenation_of_per_group_convs(groups, kernel, stride, padding):
    in_channels, filters, size = 64, 128, 9
    x = np.random.default_rng(6).normal(size=(2, size, size, in_channels)).astype("float32")
    inputs = keras.Input((size, size, in_channels))
    outputs = layers.conv2d(
        inputs,
        filters,
        kernel,
        stride=stride,
        padding=padding,
        groups=groups,
        name="conv",
        kernel_initializer=layers.kaiming_normal_initializer("fan_out"),
    )
    model = keras.Model(inputs, outputs)
    weights = keras.ops.convert_to_numpy(model.get_layer("conv").kernel)
    # HWIO with I = in_channels / groups; output channels [g * F/G, (g + 1) * F/G) are group g.
    assert weights.shape == (kernel, kernel, in_channels // groups, filters)
    cin, cout = in_channels // groups, filters // groups
    expected = np.concatenate(
        [
            _torch_conv2d(
                x[..., g * cin : (g + 1) * cin],
                weights[..., g * cout : (g + 1) * cout],
                stride,
                padding,
            )
            for g in range(groups)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected, rtol=1e-4, atol=1e-4)
    # The same as a dense convolution whose kernel is block-diagonal over the groups.
    dense = np.zeros((kernel, kernel, in_channels, filters), np.float32)
    for g in range(groups):
        dense[:, :, g * cin : (g + 1) * cin, g * cout : (g + 1) * cout] = weights[
            ..., g * cout : (g + 1) * cout
        ]
    np.testing.assert_allclose(
        _torch_conv2d(x, dense, stride, padding), expected, rtol=1e-6, atol=1e-6
    )


def test_keras_same_padding_would_misalign():
    # The reason for explicit padding: on an even input, stride-2 "same" pads bottom/right only.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 8, 8, 3)).astype("float32")
    conv = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)
    same = keras.ops.convert_to_numpy(conv(x))
    expected = _torch_conv2d(x, keras.ops.convert_to_numpy(conv.kernel), 2, 1)
    assert same.shape == expected.shape
    assert not np.allclose(same, expected, atol=1e-3)


@pytest.mark.parametrize("size", [8, 9, 112])
def test_max_pool_matches_torch_on_relu_outputs(size):
    x = np.maximum(np.random.default_rng(3).normal(size=(2, size, size, 4)), 0).astype("float32")
    inputs = keras.Input((size, size, 4))
    model = keras.Model(inputs, layers.max_pool_3x3_s2(inputs, name="pool"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), _torch_max_pool(x, 3, 2, 1))


def test_resnet18_stem_conv_matches_torch():
    model = _build("resnet18", (224, 224, 3), 1000)
    stem = keras.Model(model.input, model.get_layer("conv1").output)
    x = np.random.default_rng(4).normal(size=(1, 224, 224, 3)).astype("float32")
    kernel = keras.ops.convert_to_numpy(model.get_layer("conv1").kernel)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(stem(x)), _torch_conv2d(x, kernel, 2, 3), rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------
# Initialisers match PyTorch's (checked on large kernels, so sample statistics are tight).
# ---------------------------------------------------------------------------------------------


def _np(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable).astype(np.float64)


def _max_abs_within(values: np.ndarray, bound: float) -> bool:
    """max |values| <= bound, allowing the float32 rounding of a uniform draw at the bound."""
    return np.abs(values).max() <= bound * (1 + 1e-6)


def test_torchvision_resnet_init():
    model = _build("resnet18", (224, 224, 3), 1000)
    kernel = _np(model.get_layer("layer4_1_conv2").kernel)
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / (3 * 3 * 512)).
    assert kernel.std() == pytest.approx(math.sqrt(2.0 / (9 * 512)), rel=0.01)
    assert np.abs(kernel).max() > 4 * kernel.std()  # untruncated: the tails are there
    logits = model.get_layer("logits")
    bound = 1.0 / math.sqrt(512)
    # nn.Linear defaults: kernel and bias uniform(+-1/sqrt(fan_in)).
    assert _max_abs_within(_np(logits.kernel), bound)
    assert _np(logits.kernel).std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert _max_abs_within(_np(logits.bias), bound)
    assert np.abs(_np(logits.bias)).max() > bound / 2


def test_preact_resnet_init():
    model = _build("preact_resnet18", (32, 32, 3), 100)
    kernel = _np(model.get_layer("layer4_1_conv2").kernel)
    # kaiming_uniform_(a=sqrt(5)): uniform(+-1/sqrt(fan_in)), fan_in = 3 * 3 * 512.
    bound = 1.0 / math.sqrt(9 * 512)
    assert _max_abs_within(kernel, bound)
    assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    bias = _np(model.get_layer("logits").bias)
    assert _max_abs_within(bias, 1.0 / math.sqrt(512))
    assert np.abs(bias).max() > 0.5 / math.sqrt(512)


def test_densenet_init():
    big = _build("densenet121", (224, 224, 3), 1000)
    kernel = _np(big.get_layer("denseblock3_layer24_conv2").kernel)
    # torchvision's kaiming_normal_(w): fan_in mode, std = sqrt(2 / (3 * 3 * 128)).
    assert kernel.std() == pytest.approx(math.sqrt(2.0 / (9 * 128)), rel=0.02)
    np.testing.assert_array_equal(_np(big.get_layer("logits").bias), 0.0)

    small = _build("densenet121", (32, 32, 3), 100)
    kernel = _np(small.get_layer("denseblock3_layer24_conv2").kernel)
    bound = 1.0 / math.sqrt(9 * 128)  # the authors' CIFAR DenseNet keeps PyTorch's defaults
    assert _max_abs_within(kernel, bound)
    assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)


# ---------------------------------------------------------------------------------------------
# feature_model and mixed precision.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, input_shape, width",
    [
        ("small_convnet", (8, 8, 1), 64),
        ("mlp", (8, 8, 1), 64),
        ("preact_resnet10", (32, 32, 3), 512),
    ],
)
def test_feature_model_returns_same_logits_and_features(name, input_shape, width):
    model = _build(name, input_shape, 10)
    both = backbones.feature_model(model)
    assert both.input is model.input
    x = np.random.default_rng(5).normal(size=(2,) + input_shape).astype("float32")
    logits, features = both(x, training=False)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits),
        keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )
    assert tuple(features.shape) == (2, width)
    # The features are what the logits layer consumes: logits = features @ W + b.
    head = model.get_layer("logits")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(features) @ _np(head.kernel) + _np(head.bias),
        keras.ops.convert_to_numpy(logits),
        rtol=1e-5,
        atol=1e-5,
    )


def test_feature_model_rejects_model_without_features_layer():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="plain")
    with pytest.raises(ValueError, match="features"):
        backbones.feature_model(plain)


@pytest.mark.parametrize("name", ["small_convnet", "mlp"])
def test_logits_are_float32_under_mixed_precision(name):
    keras.backend.clear_session()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = backbones.get(name, 10, (8, 8, 1))
        assert model.get_layer("features").compute_dtype == "float16"
        assert model.get_layer("logits").compute_dtype == "float32"
        assert model.get_layer("logits").kernel.dtype == "float32"
        logits = model(np.zeros((2, 8, 8, 1), "float32"), training=False)
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
