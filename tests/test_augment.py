"""Training augmentation against known answers: which box, which offset, how often a flip.

`Augmenter.train` is probed with images whose pixels say where they come from (channel 0 holds
the row index, channel 1 the column index): bilinear resizing maps a linear ramp to a linear
ramp, so each output reveals the box it was cut from, and whether it was mirrored. The crops
are then checked against the ranges `cskd_tf/data/augment.py` documents, over many seeds, and
each output against resizing (or cutting) that box of the input by hand.
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from cskd_tf import data
from cskd_tf.data import augment

# The documented ranges of the random-resized crop (augment.py's module docstring).
AREA = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def pixels(out, preset):
    """Undoes the preset's normalisation: the float pixels before it."""
    p = augment.PRESETS[preset]
    return (np.asarray(out, np.float64) * np.array(p.std) + np.array(p.mean)) * 255.0


def probe(height, width, seed=0):
    """`[H, W, 3]` float32: row index, column index, random content in [0, 255)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    content = np.random.default_rng(seed).uniform(0, 255, (height, width))
    return np.stack([rows, cols, content], -1).astype(np.float32)


def train_views(preset, image, seeds):
    """`Augmenter.train` of one image under each stateless seed, inside `Dataset.map`."""
    aug = data.Augmenter(preset)
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(seeds, np.int64))
    ds = ds.map(lambda s: aug.train(image, seed=s), num_parallel_calls=tf.data.AUTOTUNE)
    return np.concatenate([b.numpy() for b in ds.batch(500)])


def decode_boxes(views):
    """`(top, height, left, width, flipped)` of each resized-crop view of a `probe` image.

    Half-pixel bilinear resizing of a box `[top, top + height)` to `S` pixels gives output
    pixel `o` the value `top - 1/2 + (o + 1/2) height / S` of a row ramp (antialiasing only
    rounds it slightly): a least-squares line over the central outputs recovers the box.
    """
    size = views.shape[1]
    o = np.arange(size // 8, size - size // 8)
    design = np.stack([np.ones(len(o)), (o + 0.5) / size], 1)

    def line(profiles):
        (offset, extent), *_ = np.linalg.lstsq(design, profiles[:, o].T, rcond=None)
        return offset + 0.5, extent

    rows = views[..., 0].mean(axis=2)  # [N, S]: the row ramp along the output's rows.
    cols = views[..., 1].mean(axis=1)
    flipped = cols[:, -1] < cols[:, 0]
    cols = np.where(flipped[:, None], cols[:, ::-1], cols)
    top, height = line(rows)
    left, width = line(cols)
    box = np.stack([top, height, left, width], 1)
    # The box has whole-pixel edges: anything else means the output is no resized box.
    np.testing.assert_allclose(box, np.round(box), atol=0.2)
    return (*np.round(box).astype(int).T, flipped)


@pytest.mark.parametrize("preset,shape", [("imagenet", (300, 400)), ("tiny", (64, 64))])
def test_resized_crop_is_the_resized_box_of_the_input(preset, shape):
    """Each view is the bilinear (antialiased) resize of a box of the input, maybe mirrored.

    Mutant run: the box resized to the input size without the antialias filter
    (`antialias=False` in `Augmenter._resized_crop`): `assert_allclose(views[i], expected)`
    fails for the 224-pixel preset (98% of the pixels, by up to 118 of 255).
    """
    image = probe(*shape)
    seeds = np.random.default_rng(0).integers(0, 2**31, (12, 2))
    views = pixels(train_views(preset, image, seeds), preset)
    tops, heights, lefts, widths, flipped = decode_boxes(views)
    size = augment.PRESETS[preset].size
    for i, seed in enumerate(seeds):
        assert 0 <= tops[i] < tops[i] + heights[i] <= shape[0]
        assert 0 <= lefts[i] < lefts[i] + widths[i] <= shape[1]
        box = image[tops[i] : tops[i] + heights[i], lefts[i] : lefts[i] + widths[i]]
        expected = tf.image.resize(box, (size, size), method="bilinear", antialias=True).numpy()
        if flipped[i]:
            expected = expected[:, ::-1]
        np.testing.assert_allclose(views[i], expected, atol=2e-3, err_msg=f"seed {seed}")
        # The same draw eagerly as inside Dataset.map.
        eager = data.Augmenter(preset).train(tf.constant(image), seed=tf.constant(seed))
        np.testing.assert_allclose(pixels(eager, preset), views[i], atol=1e-3)


def test_resized_crop_boxes_span_the_documented_ranges_and_flip_half_the_time():
    """2,000 seeds: every box within 8-100% of the area and a ratio within 3/4-4/3, the ranges
    filled out to their ends, boxes anywhere in the image, and a flip half of the time.

    The quantile checks hold for TensorFlow's sampler (the ratio uniform, the height uniform
    between the smallest and largest admissible: median area 0.36) and for torchvision's
    (the area uniform, the log-ratio uniform: median 0.48) alike.

    Mutants run: (1) the sampler's box replaced by the whole image (`crop = image` in
    `Augmenter._resized_crop`; `test_pairs.py` and `test_sources.py` pass with it):
    `areas.min() <= 0.09` fails, every area is 1.0; (2) `area_range=(0.25, 1.0)`: the same
    assertion fails (0.25); (3) the flip removed from `Augmenter.train`: the binomial test of
    the flips fails (0 of 2,000, p = 0).
    """
    side, n = 96, 2000
    image = probe(side, side)
    seeds = np.random.default_rng(1).integers(0, 2**31, (n, 2))
    tops, heights, lefts, widths, flipped = decode_boxes(pixels(train_views("tiny", image, seeds),
                                                                "tiny"))  # fmt: skip
    areas = heights * widths / side**2
    ratios = widths / heights
    rounding = 0.5 / heights  # A box has whole-pixel sides: its ratio is rounded.
    # Inside the image and the documented ranges (the area's bound up to rounding).
    assert np.all(tops >= 0) and np.all(tops + heights <= side)
    assert np.all(lefts >= 0) and np.all(lefts + widths <= side)
    assert np.all(areas >= AREA[0] - 0.005) and np.all(areas <= AREA[1])
    assert np.all(ratios >= RATIO[0] - rounding) and np.all(ratios <= RATIO[1] + rounding)
    # Filled out: both ends of each range are reached, and the middle is not all there is.
    assert areas.min() <= 0.09 and areas.max() >= 0.9
    small, large = np.mean(areas < 0.2), np.mean(areas > 0.6)
    assert small > 0.1 and large > 0.1, (small, large)
    assert np.quantile(ratios, 0.01) < 0.77 and np.quantile(ratios, 0.99) > 1.30
    assert 0.3 < np.mean(ratios > 1) < 0.7
    # Anywhere in the image: the box's place in its range of free positions is spread out.
    for start, extent in ((tops, heights), (lefts, widths)):
        free = side - extent
        place = start[free > 0] / free[free > 0]
        assert 0.4 < place.mean() < 0.6 and np.mean(place < 0.25) > 0.15, place.mean()
    # The flip: a fair coin, independent of the box.
    assert stats.binomtest(int(flipped.sum()), n, 0.5).pvalue > 1e-3, flipped.mean()


def pad_crop_origins(views, image, pad):
    """`(top, left, flipped)` of each view, cut from `image` zero-padded by `pad`.

    Every view must equal exactly one of the `(2 pad + 1)^2` windows, or its mirror.
    """
    h, w = image.shape[:2]
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)]).astype(np.float64)
    origins = [(i, j, f) for f in (False, True) for i in range(2 * pad + 1)
               for j in range(2 * pad + 1)]  # fmt: skip
    windows = np.stack([
        (padded[i : i + h, j : j + w, :][:, ::-1] if f else padded[i : i + h, j : j + w, :]).ravel()
        for i, j, f in origins
    ])  # fmt: skip
    flat = views.reshape(len(views), -1)
    # Squared distances of every view to every window; a match is within rounding.
    distances = (flat**2).sum(1)[:, None] - 2 * flat @ windows.T + (windows**2).sum(1)[None]
    best = distances.argmin(1)
    worst = np.abs(flat - windows[best]).max(1)
    assert worst.max() < 0.01, worst.max()
    return np.array([origins[b] for b in best]).T


@pytest.mark.parametrize("preset,flips", [("cifar", True), ("digits", False)])
def test_pad_crop_offsets_are_uniform_and_flips_happen_half_the_time(preset, flips):
    """Every padded position equally likely (a χ² test over the (2 pad + 1)^2 windows), and a
    mirror image half of the time (CIFAR) or never (digits, which are not mirror-symmetric).

    Mutants run: (1) `Augmenter.train` returning the image untouched, only normalised (no
    pad, no crop, no flip; `test_pad_crop_is_a_translation_of_the_padded_image` accepts it):
    every view is the centre window and `chisquare(counts).pvalue > 1e-3` fails (p = 0) for
    both presets; (2) the flip removed: the binomial test fails for CIFAR (0 of 1,600).
    """
    p = augment.PRESETS[preset]
    image = np.random.default_rng(0).integers(1, 256, size=p.input_shape, dtype=np.uint8)
    n = 1600 if preset == "cifar" else 900
    seeds = np.random.default_rng(2).integers(0, 2**31, (n, 2))
    views = np.round(pixels(train_views(preset, image, seeds), preset))
    tops, lefts, flipped = pad_crop_origins(views, image, p.pad)
    positions = 2 * p.pad + 1
    counts = np.bincount(tops * positions + lefts, minlength=positions**2)
    assert stats.chisquare(counts).pvalue > 1e-3, counts.reshape(positions, positions)
    if flips:
        assert stats.binomtest(int(flipped.sum()), n, 0.5).pvalue > 1e-3, flipped.mean()
    else:
        assert not flipped.any()
    # The same draws eagerly as inside Dataset.map.
    aug = data.Augmenter(preset)
    for seed, view in zip(seeds[:4], views):
        eager = aug.train(tf.constant(image), seed=tf.constant(seed))
        np.testing.assert_array_equal(np.round(pixels(eager, preset)), view)
