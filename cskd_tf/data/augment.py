"""Per-data-set augmentation and normalisation (REFERENCE.md, "Data and augmentation").

Every random choice (crop, flip) is a stateless function of a per-image seed
that the pipeline derives from the run's seed, the epoch and the image's place
in it. The draws are therefore the same whatever the order in which parallel
`Dataset.map` calls run, and a run resumed mid-epoch makes exactly the draws
an uninterrupted one makes.

The random-resized crop is TensorFlow's `stateless_sample_distorted_bounding_box`
with torchvision's ranges (area 8-100%, aspect ratio 3/4-4/3, 10 attempts).
keras-cv's `RandomCropAndResize`, which this module used before, draws from a
stateful generator that cannot be given a per-image seed, so it is no longer
needed (see the README, "Interrupted runs and errors").
"""

import dataclasses

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


def _seeds(seed, count):
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), count))


class Augmenter:
    """Turns one decoded uint8 image into a normalised float32 network input.

    `train(image, seed)` draws its crop and flip from `seed` alone (stateless);
    the pipelines of `cskd_tf.data` hand every image view its own seed. Called
    without one (in a user's own `Dataset.map`), it takes the next seed of a
    random generator seeded by `seed` below: every call gets new draws, but
    their order then depends on the order in which parallel calls run.

    Create one per pipeline, outside `Dataset.map` (it owns that generator).

    Args:
      preset: str or Preset. One of `PRESETS`.
      seed: int or None. Seeds the generator of calls made without a per-image seed.
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
        self._generator = (
            tf.random.Generator.from_non_deterministic_state()
            if seed is None
            else tf.random.Generator.from_seed(seed)
        )

    @property
    def input_shape(self):
        return self.preset.input_shape

    def _normalize(self, image):
        image = image / 255.0
        mean = tf.constant(self.preset.mean, tf.float32)
        std = tf.constant(self.preset.std, tf.float32)
        return (image - mean) / std

    def _resized_crop(self, image, seed):
        # torchvision's RandomResizedCrop: a box of 8-100% of the area and aspect ratio 3/4-4/3,
        # resized to the input size (after 10 failed attempts, the whole image).
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.slice(image, begin, size)
        side = self.preset.size
        return tf.image.resize(crop, (side, side), method="bilinear", antialias=True)

    def train(self, image, seed=None):
        """Random augmentation for training, then normalisation.

        Args:
          image: uint8 (or float) tensor `[H, W, C]`.
          seed: int tensor `[2]` or None. The image's stateless seed.
        """
        p = self.preset
        if seed is None:
            seed = self._generator.make_seeds(1)[:, 0]
        crop_seed, flip_seed = _seeds(seed, 2)
        image = tf.cast(image, tf.float32)
        if p.train_crop == "pad_crop":
            # Zero padding of the raw pixels, as torchvision's RandomCrop(padding=4).
            image = tf.pad(image, [[p.pad, p.pad], [p.pad, p.pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, p.input_shape, crop_seed)
        elif p.train_crop == "resized_crop":
            image = self._resized_crop(image, crop_seed)
        if p.flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        image = tf.ensure_shape(image, p.input_shape)
        return self._normalize(image)

    def eval(self, image):
        """Deterministic test-time preprocessing: resize, centre crop, normalise."""
        p = self.preset
        image = tf.cast(image, tf.float32)
        if p.eval_resize is not None:
            image = resize_shorter_side(image, p.eval_resize)
            image = center_crop(image, p.size)
        image = tf.ensure_shape(image, p.input_shape)
        return self._normalize(image)


def center_crop(image, size):
    """The central `size` x `size` window (torchvision `CenterCrop`; the image is at least that big)."""
    shape = tf.shape(image)
    top = (shape[0] - size) // 2
    left = (shape[1] - size) // 2
    return image[top : top + size, left : left + size]
