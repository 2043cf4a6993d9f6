"""DenseNet-121 (DenseNet-BC, growth 32, blocks 6/12/24/16, 64 initial features, bn_size 4).

One builder serves both input regimes of the paper, picking the stem from the input height:

- height <= 64 (CIFAR-100, TinyImageNet at 32x32): the authors' `CIFAR_DenseNet121`
  (alinlab/cs-kd, `models/densenet3.py`): a single 3x3, stride-1, bias-free convolution to 64
  channels, with no batch-norm, ReLU or pooling after it (the first dense layer pre-activates
  its input anyway), and PyTorch's default initialisers (that file sets none).
- height > 64 (224x224 fine-grained sets): torchvision's `densenet121` (copied in the authors'
  `models/densenet.py`): 7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2 max-pool, and
  torchvision's initialisers.

The body is shared: four dense blocks of pre-activation bottleneck layers
(BN-ReLU-conv1x1(128)-BN-ReLU-conv3x3(32), output concatenated to the input), transitions
BN-ReLU-conv1x1(channels // 2)-avgpool2x2 between blocks, then a final BN-ReLU, global average
pool (`features`, 1024-d) and a dense layer with bias (`logits`). The 64-pixel threshold sends
32x32 and 64x64 inputs (CIFAR, TinyImageNet at either size) to the 3x3 stem: the 7x7 stem and
its max-pool divide the size by 32 overall, which would leave them a 1x1 or 2x2 last feature map.

The 32x32 reference pools with `avg_pool2d(out, 4)`, a global average on 32x32 inputs; a
global average pool is used for every size here.
"""

from __future__ import annotations

import functools

import keras

from cskd_tf.backbones import layers

GROWTH_RATE = 32
BLOCK_CONFIG = (6, 12, 24, 16)
NUM_INIT_FEATURES = 64
BN_SIZE = 4
SMALL_STEM_MAX_HEIGHT = 64


def _dense_layer(x, small_stem: bool, conv_init, name: str):
    """One bottleneck dense layer; returns its input concatenated with 32 new channels.

    Args:
        x: KerasTensor. Concatenated features so far.
        small_stem: bool. True for the 32x32 variant, whose reference concatenates
            `[new, x]`; torchvision concatenates `[x, new]`. The order only permutes channels,
            so it changes nothing but which weight slice sees which channel.
        conv_init: Callable[[], keras.initializers.Initializer]. Convolution initialiser factory.
        name: str. Layer-name prefix, e.g. `denseblock1_layer1`.

    Returns:
        KerasTensor. `x` with `GROWTH_RATE` more channels.
    """
    out = layers.batch_norm(x, name=f"{name}_norm1")
    out = layers.relu(out, name=f"{name}_relu1")
    out = layers.conv2d(
        out,
        BN_SIZE * GROWTH_RATE,
        1,
        padding=0,
        name=f"{name}_conv1",
        kernel_initializer=conv_init(),
    )
    out = layers.batch_norm(out, name=f"{name}_norm2")
    out = layers.relu(out, name=f"{name}_relu2")
    out = layers.conv2d(out, GROWTH_RATE, 3, name=f"{name}_conv2", kernel_initializer=conv_init())
    pieces = [out, x] if small_stem else [x, out]
    return keras.layers.Concatenate(axis=-1, name=f"{name}_concat")(pieces)


def _transition(x, out_channels: int, conv_init, name: str):
    """BN-ReLU-conv1x1-avgpool2x2 between two dense blocks (compression 0.5).

    Args:
        x: KerasTensor. Output of a dense block.
        out_channels: int. Channels after the 1x1 convolution.
        conv_init: Callable[[], keras.initializers.Initializer]. Convolution initialiser factory.
        name: str. Layer-name prefix, e.g. `transition1`.

    Returns:
        KerasTensor. Half the spatial size (floored, as PyTorch's `AvgPool2d(2, 2)`).
    """
    x = layers.batch_norm(x, name=f"{name}_norm")
    x = layers.relu(x, name=f"{name}_relu")
    x = layers.conv2d(
        x, out_channels, 1, padding=0, name=f"{name}_conv", kernel_initializer=conv_init()
    )
    return keras.layers.AveragePooling2D(
        pool_size=2, strides=2, padding="valid", name=f"{name}_pool"
    )(x)


def densenet121(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """Builds DenseNet-121, with the 3x3 stem when the input height is <= 64, else the 7x7 stem.

    Args:
        num_classes: int. Number of classes.
        input_shape: tuple[int, int, int]. (height, width, channels) of normalised images.

    Returns:
        keras.Model. Named `densenet121`; maps images to float32 logits [batch, num_classes];
        its layer `features` outputs the pooled 1024-d penultimate features.

    Reference:
        Huang et al., "Densely Connected Convolutional Networks", CVPR 2017 (DenseNet-BC);
        CS-KD (Yun et al., CVPR 2020), section 3.1, "Network architecture".
    """
    input_shape = layers.check_arguments("densenet121", num_classes, input_shape)
    small_stem = input_shape[0] <= SMALL_STEM_MAX_HEIGHT
    if small_stem:
        # CIFAR_DenseNet121 sets no initialiser: nn.Conv2d's default kaiming_uniform(a=sqrt(5)).
        conv_init = layers.torch_default_kernel_initializer
    else:
        # torchvision: kaiming_normal_(w) with its defaults, i.e. fan_in and gain sqrt(2).
        conv_init = functools.partial(layers.kaiming_normal_initializer, "fan_in")

    inputs = keras.Input(shape=input_shape, name="images")
    if small_stem:
        x = layers.conv2d(
            inputs, NUM_INIT_FEATURES, 3, stride=1, name="conv0", kernel_initializer=conv_init()
        )
    else:
        x = layers.conv2d(
            inputs,
            NUM_INIT_FEATURES,
            7,
            stride=2,
            padding=3,
            name="conv0",
            kernel_initializer=conv_init(),
        )
        x = layers.batch_norm(x, name="norm0")
        x = layers.relu(x, name="relu0")
        x = layers.max_pool_3x3_s2(x, name="pool0")

    channels = NUM_INIT_FEATURES
    for block, num_layers in enumerate(BLOCK_CONFIG, 1):
        for index in range(1, num_layers + 1):
            x = _dense_layer(x, small_stem, conv_init, name=f"denseblock{block}_layer{index}")
            channels += GROWTH_RATE
        if block != len(BLOCK_CONFIG):
            channels //= 2
            x = _transition(x, channels, conv_init, name=f"transition{block}")

    x = layers.batch_norm(x, name="norm5")
    x = layers.relu(x, name="relu5")
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    if small_stem:
        # nn.Linear defaults: uniform(+-1/sqrt(fan_in)) bias.
        bias_init = layers.torch_default_bias_initializer(channels)
    else:
        # torchvision zeroes the classifier bias (and leaves its kernel at the default).
        bias_init = keras.initializers.Zeros()
    logits = layers.classifier_head(
        features,
        num_classes,
        # Both references leave the classifier kernel at nn.Linear's kaiming_uniform(a=sqrt(5)).
        kernel_initializer=layers.torch_default_kernel_initializer(),
        bias_initializer=bias_init,
    )
    return keras.Model(inputs, logits, name="densenet121")
