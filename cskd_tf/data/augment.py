"""Per-data-set augmentation and normalisation (REFERENCE.md, "Data and augmentation").

keras-cv is used here and nowhere else, for the one layer core Keras lacks: the
random-resized crop. It is imported only by the presets that need it, since
importing it takes several seconds.
"""

import dataclasses

import keras
import tensorflow as tf

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Mean and std of scikit-learn's digits as stored here (uint8 pixels / 255), all 1,797.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3759,)


@dataclasses.dataclass(frozen=True)
class Preset:
    """How one family of data sets is augmented and normalised.

    Attributes:
      name: str. Preset name.
      size: int. Side of the square network input.
      channels: int. Image channels.
      train_crop: str. `pad_crop` (pad, random crop), `resized_crop` (random
        resized crop) or `none`.
      pad: int. Padding for `pad_crop`.
      flip: bool. Random horizontal flip during training.
      eval_resize: int or None. Shorter side before the centre crop at test time.
      mean: tuple. Per-channel mean of pixels scaled to [0, 1].
      std: tuple. Per-channel standard deviation.
    """

    name: str
    size: int
    channels: int
    train_crop: str
    pad: int = 0
    flip: bool = True
    eval_resize: int | None = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def input_shape(self):
        return (self.size, self.size, self.channels)


PRESETS = {
    # Translations of one pixel; digits are not mirror-symmetric, so no flip.
    "digits": Preset(
        "digits", 8, 1, "pad_crop", pad=1, flip=False, mean=DIGITS_MEAN, std=DIGITS_STD
    ),
    "cifar": Preset("cifar", 32, 3, "pad_crop", pad=4, mean=CIFAR_MEAN, std=CIFAR_STD),
    "tiny": Preset("tiny", 32, 3, "resized_crop", eval_resize=32),
    "imagenet": Preset("imagenet", 224, 3, "resized_crop", eval_resize=256),
}


def resize_shorter_side(image, size):
    """Resizes so that the shorter side is `size`, keeping the aspect ratio (torchvision `Resize(int)`)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    return tf.image.resize(image, new_shape, method="bilinear", antialias=True)


class Augmenter:
    """Turns one decoded uint8 image into a normalised float32 network input.

    Create one per pipeline, outside `Dataset.map`: its random layers keep
    their state between calls, so anchors and partners get independent draws.

    Args:
      preset: str or Preset. One of `PRESETS`.
      seed: int or None. Seeds the random layers.
    """

    def __init__(self, preset, seed=None):
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(
                    f"Unknown augmentation preset '{preset}'. Choose one of: "
                    f"{', '.join(sorted(PRESETS))}."
                )
            preset = PRESETS[preset]
        self.preset = preset
        size = preset.size
        if preset.train_crop == "pad_crop":
            self._crop = keras.layers.RandomCrop(size, size, seed=seed)
        elif preset.train_crop == "resized_crop":
            import keras_cv  # pylint: disable=g-import-not-at-top

            # torchvision's RandomResizedCrop defaults: scale (0.08, 1), ratio (3/4, 4/3).
            self._crop = keras_cv.layers.RandomCropAndResize(
                target_size=(size, size),
                crop_area_factor=(0.08, 1.0),
                aspect_ratio_factor=(3 / 4, 4 / 3),
                seed=seed,
            )
        else:
            self._crop = None
        self._flip = (
            keras.layers.RandomFlip("horizontal", seed=None if seed is None else seed + 1)
            if preset.flip
            else None
        )
        self._center_crop = keras.layers.CenterCrop(size, size)

    @property
    def input_shape(self):
        return self.preset.input_shape

    def _normalize(self, image):
        image = image / 255.0
        mean = tf.constant(self.preset.mean, tf.float32)
        std = tf.constant(self.preset.std, tf.float32)
        return (image - mean) / std

    def train(self, image):
        """Random augmentation for training, then normalisation."""
        p = self.preset
        image = tf.cast(image, tf.float32)
        if p.train_crop == "pad_crop":
            # Zero padding of the raw pixels, as torchvision's RandomCrop(padding=4).
            image = tf.pad(image, [[p.pad, p.pad], [p.pad, p.pad], [0, 0]])
        if self._crop is not None:
            image = self._crop(image)
        if self._flip is not None:
            image = self._flip(image)
        image = tf.ensure_shape(image, p.input_shape)
        return self._normalize(image)

    def eval(self, image):
        """Deterministic test-time preprocessing: resize, centre crop, normalise."""
        p = self.preset
        image = tf.cast(image, tf.float32)
        if p.eval_resize is not None:
            image = resize_shorter_side(image, p.eval_resize)
            image = self._center_crop(image)
        image = tf.ensure_shape(image, p.input_shape)
        return self._normalize(image)
