"""CutMix (`cskd_tf.data.cutmix`) and its methods `cutmix` and `cutmix_cskd`."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from cskd_tf import backbones
from cskd_tf import losses
from cskd_tf import methods
from cskd_tf import train
from cskd_tf.data import cutmix
from cskd_tf.data import mixup
from cskd_tf.methods import cutmix as cutmix_method
from cskd_tf.model import CSKDModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE, CLASSES = (6, 6, 1), 3


def images(n=4, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, CLASSES, size=n)


# --- The box and the cut, by hand -------------------------------------------------------------


def test_box_by_hand_and_clipped_at_the_border():
    # lam = 0.75: sides int(8 * 0.5) = 4, two pixels on each side of the centre.
    np.testing.assert_array_equal(cutmix.box(8, 8, 0.75, 2, 5).numpy(), [0, 4, 3, 7])
    # A centre in the corner: the box is clipped to 2 x 2, and lam is recomputed from it.
    corner = cutmix.box(8, 8, 0.75, 0, 0)
    np.testing.assert_array_equal(corner.numpy(), [0, 2, 0, 2])
    assert float(cutmix.box_lambda(corner, 8, 8)) == pytest.approx(1 - 4 / 64)
    # Truncation as the authors' np.int: 6 * sqrt(0.5) = 4.24 -> 4; odd sides lose a pixel.
    np.testing.assert_array_equal(cutmix.box(6, 10, 0.5, 3, 5).numpy(), [1, 5, 2, 8])
    np.testing.assert_array_equal(cutmix.box(5, 5, 0.0, 2, 2).numpy(), [0, 4, 0, 4])


def test_the_cut_region_is_exactly_the_permuted_images_pixels():
    x, y = images()
    permutation = tf.constant([2, 0, 3, 1])
    box = tf.constant([1, 4, 2, 6])  # Rows 1-3, columns 2-5: 12 of 36 pixels.
    cut, soft, lam = cutmix.cut_batch(x, y, CLASSES, box, permutation)
    cut = cut.numpy()
    inside = np.zeros(SHAPE[:2], bool)
    inside[1:4, 2:6] = True
    np.testing.assert_array_equal(cut[:, inside], x[permutation.numpy()][:, inside])
    np.testing.assert_array_equal(cut[:, ~inside], x[:, ~inside])
    assert float(lam) == pytest.approx(1 - 12 / 36)
    expected = lam * np.eye(CLASSES)[y] + (1 - lam) * np.eye(CLASSES)[y[permutation.numpy()]]
    np.testing.assert_allclose(soft.numpy(), expected, rtol=1e-6)


def test_a_zero_area_box_leaves_the_images_and_their_labels_unchanged():
    x, y = images()
    empty = cutmix.box(6, 6, 1.0, 3, 3)  # lam = 1: sides 0.
    assert float(cutmix.box_lambda(empty, 6, 6)) == 1.0
    cut, soft, _ = cutmix.cut_batch(x, y, CLASSES, empty, tf.constant([1, 2, 3, 0]))
    np.testing.assert_array_equal(cut.numpy(), x)
    np.testing.assert_array_equal(soft.numpy(), np.eye(CLASSES)[y])


def test_partners_are_cut_with_their_anchors_box_lam_and_permutation():
    x, y = images()
    (cut, cut_pair), soft, _ = cutmix.cut_batch(
        (x, x + 100.0), y, CLASSES, tf.constant([0, 3, 1, 5]), tf.constant([3, 2, 1, 0])
    )
    np.testing.assert_array_equal(cut_pair.numpy(), cut.numpy() + 100.0)
    assert soft.shape == (4, CLASSES)


# --- The draws: lam, box, permutation, probability --------------------------------------------


def draws(alpha, prob=1.0, n=3000, size=32, seed=0):
    """`n` batches' draws, keys 0 to n - 1 (inside tf.data: thousands of eager calls are slow)."""
    keys = tf.data.Dataset.range(n)
    out = keys.map(lambda k: cutmix.draw(seed, k, alpha, prob, [5], size, size)).batch(n)
    lam, permutations, boxes, applied = next(out.as_numpy_iterator())
    return lam, boxes, permutations, applied


def official_rand_bbox_lambdas(lam, size, rng):
    """The authors' rand_bbox and lam recomputation, written out in numpy."""
    cut = (size * np.sqrt(1 - lam)).astype(int)
    cx, cy = rng.integers(0, size, len(lam)), rng.integers(0, size, len(lam))
    x1, x2 = np.clip(cx - cut // 2, 0, size), np.clip(cx + cut // 2, 0, size)
    y1, y2 = np.clip(cy - cut // 2, 0, size), np.clip(cy + cut // 2, 0, size)
    return 1 - (x2 - x1) * (y2 - y1) / size**2


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_lam_follows_beta_and_the_clipped_area_the_authors_code(alpha):
    lam, boxes, permutations, applied = draws(alpha)
    assert applied.all()
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    assert lam.mean() == pytest.approx(0.5, abs=0.02)
    assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.08)
    # The label weight is the clipped box's: against the authors' rand_bbox on Beta draws.
    area = 1 - (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / 32**2
    reference = official_rand_bbox_lambdas(np.random.default_rng(0).beta(alpha, alpha, 200000),
                                           32, np.random.default_rng(1))  # fmt: skip
    assert area.mean() == pytest.approx(reference.mean(), abs=0.015)
    assert area.std() == pytest.approx(reference.std(), rel=0.05)
    assert (area >= lam - 1e-6).mean() > 0.99  # Clipping and truncation only shrink the box.
    # Centres uniform over the pixels; permutations are permutations.
    centres = (boxes[:, 0] + boxes[:, 1]) / 2
    assert 0 <= boxes.min() and boxes.max() <= 32 and 12 < centres.mean() < 20
    assert all(sorted(p) == list(range(5)) for p in permutations)


@pytest.mark.parametrize("prob", [0.0, 0.5])
def test_a_batch_is_cut_with_probability_prob(prob):
    _, boxes, _, applied = draws(1.0, prob=prob, n=400)
    assert applied.mean() == pytest.approx(prob, abs=0.07)
    np.testing.assert_array_equal(boxes[~applied], 0)  # Not cut: an empty box.


def pairs(n=12, seed=0):
    x, y = images(n, seed=seed)
    return tf.data.Dataset.from_tensor_slices(((x, x + 100.0), y)).batch(4)


def test_prob_zero_is_the_identity_with_one_hot_labels():
    ds = pairs()
    for ((a, b), y), ((a2, b2), soft) in zip(
        ds.as_numpy_iterator(), cutmix.cutmix(ds, CLASSES, prob=0.0, seed=3).as_numpy_iterator()
    ):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(b2, b)
        np.testing.assert_array_equal(soft, np.eye(CLASSES)[y])


def test_dataset_cuts_partners_like_anchors_and_repeats_with_the_seed():
    first = list(cutmix.cutmix(pairs(), CLASSES, seed=5, first_batch=0).as_numpy_iterator())
    again = list(cutmix.cutmix(pairs(), CLASSES, seed=5, first_batch=0).as_numpy_iterator())
    originals = list(pairs().as_numpy_iterator())
    for ((x, x_pair), soft), ((x2, _), soft2), ((x0, _), _) in zip(first, again, originals):
        np.testing.assert_array_equal(x_pair, x + 100.0)
        np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(soft, soft2)
    assert any((x != x0).any() for ((x, _), _), ((x0, _), _) in zip(first, originals))


def test_the_transform_is_the_same_eagerly_and_inside_tf_data():
    ds = pairs()
    inside = list(cutmix.cutmix(ds, CLASSES, alpha=1.0, prob=1.0, seed=7, first_batch=3)
                  .as_numpy_iterator())  # fmt: skip
    for i, ((x, x_pair), y) in enumerate(ds.as_numpy_iterator()):
        _, permutation, box, _ = cutmix.draw(7, tf.constant(3 + i, tf.int64), 1.0, 1.0,
                                             tf.shape(y), 6, 6)  # fmt: skip
        (cut, cut_pair), soft, _ = cutmix.cut_batch((x, x_pair), y, CLASSES, box, permutation)
        np.testing.assert_array_equal(cut.numpy(), inside[i][0][0])
        np.testing.assert_array_equal(cut_pair.numpy(), inside[i][0][1])
        np.testing.assert_array_equal(soft.numpy(), inside[i][1])
    # Batch i of a dataset that starts at step k is batch 0 of one that starts at k + i.
    later = next(cutmix.cutmix(ds.skip(2), CLASSES, seed=7, first_batch=5).as_numpy_iterator())
    np.testing.assert_array_equal(later[0][0], inside[2][0][0])


def test_mixup_draws_are_the_ones_the_committed_digits_results_used():
    # Mixup shares the per-batch keys and draws with CutMix; these are the outputs of the
    # code before the sharing (the committed results/digits mixup runs depend on them).
    x = tf.constant([[0.0], [1.0], [2.0], [3.0], [4.0]])
    ds = tf.data.Dataset.from_tensors((x, tf.constant([0, 1, 2, 0, 1]))).repeat(3)
    got = [m[:, 0] for m, _ in mixup.mixup(ds, 3, seed=0, first_batch=5).as_numpy_iterator()]
    expected = [
        [1.7066473960876465, 1.0, 3.7066473960876465, 3.0, 0.5867053270339966],
        [0.4502272605895996, 0.5497727394104004, 2.4502272605895996, 2.5497727394104004, 4.0],
        [2.9375109672546387, 1.979170322418213, 3.958340644836426, 0.06248901039361954,
         1.0624890327453613],
    ]  # fmt: skip
    np.testing.assert_array_equal(np.array(got), np.array(expected, np.float32))


# --- The methods ------------------------------------------------------------------------------


def context(shape=SHAPE):
    return methods.Context(
        dataset="test", backbone="mlp", num_classes=CLASSES, input_shape=shape,
        train_size=8, epochs=1, steps_per_epoch=1,
    )  # fmt: skip


def options(method, **given):
    values = {name: flag.default for name, flag in methods.get(method).flags.items()}
    return {**values, "seed": 0, **given}


def test_the_default_probability_is_the_authors_for_the_input_size():
    assert cutmix_method.probability(options("cutmix"), context((32, 32, 3))) == 0.5
    assert cutmix_method.probability(options("cutmix"), context((224, 224, 3))) == 1.0
    given = options("cutmix", cutmix_prob=0.25)
    assert cutmix_method.probability(given, context((224, 224, 3))) == 0.25


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get("mlp", CLASSES, SHAPE)


def one_cut_batch(method, paired):
    x, y = images(8, seed=1)
    ds = tf.data.Dataset.from_tensors(((x, x[::-1] * 0.5), y) if paired else (x, y))
    spec = methods.get(method)
    batch = next(spec.transform(ds, options(method), context(), 0).as_numpy_iterator())
    cut = batch[0][0] if paired else batch[0]
    assert (cut != x).any()  # 6 x 6 inputs: prob 0.5, and this batch (key 0) is cut.
    return batch


def sgd_step(model, batch, lr=0.1):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=losses.ClassificationLoss())
    ds = tf.data.Dataset.from_tensors(batch)
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


def expected_step(objective, lr=0.1):
    reference = mlp()
    with tf.GradientTape() as tape:
        loss = objective(reference)
    grads = tape.gradient(loss, reference.trainable_weights)
    return [w.numpy() - lr * g.numpy() for w, g in zip(reference.trainable_weights, grads)], loss


def assert_weights(model, expected):
    for w, e in zip(model.backbone.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)


def test_cutmix_step_is_cross_entropy_on_the_mixed_labels():
    x, soft = one_cut_batch("cutmix", paired=False)

    def objective(net):
        log_p = tf.nn.log_softmax(net(x))
        return tf.reduce_mean(-tf.reduce_sum(soft * log_p, -1))

    expected, loss = expected_step(objective)
    model = methods.get("cutmix").make_model(mlp(), options("cutmix"), context())
    history = sgd_step(model, (x, soft))
    assert_weights(model, expected)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)


def test_cutmix_cskd_step_is_cskd_on_cut_pairs():
    (x, x_pair), soft = one_cut_batch("cutmix_cskd", paired=True)

    def objective(net):
        logits = net(x)
        ce = -tf.reduce_sum(soft * tf.nn.log_softmax(logits), -1)
        log_q = tf.nn.log_softmax(tf.stop_gradient(net(x_pair)) / 4.0)
        kl = tf.reduce_sum(tf.exp(log_q) * (log_q - tf.nn.log_softmax(logits / 4.0)), -1)
        return tf.reduce_mean(ce) + 16.0 * tf.reduce_mean(kl)

    expected, loss = expected_step(objective)
    model = methods.get("cutmix_cskd").make_model(mlp(), options("cutmix_cskd"), context())
    assert isinstance(model, CSKDModel)
    history = sgd_step(model, ((x, x_pair), soft))
    assert_weights(model, expected)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)


# --- Flagfiles and the command line ----------------------------------------------------------


def parse_flagfile(path):
    values = flags.FlagValues()
    holders = train.define_flags(values)
    cwd = os.getcwd()
    os.chdir(ROOT)  # Flagfiles include configs/base.flags relative to the root.
    try:
        values(["train", f"--flagfile={path}"])
    finally:
        os.chdir(cwd)
    return {name: holder.value for name, holder in holders.items()}


@pytest.mark.parametrize(
    "name,dataset,backbone,prob",
    [("cifar100-cutmix", "cifar100", "preact_resnet18", 0.5),
     ("cub-cutmix", "cub", "resnet18", 1.0),
     ("cifar100-cutmix_cskd", "cifar100", "preact_resnet18", 0.5),
     ("cub-cutmix_cskd", "cub", "resnet18", 1.0)],
)  # fmt: skip
def test_flagfiles_parse_and_name_known_things(name, dataset, backbone, prob):
    path = ROOT / "configs" / "methods" / f"{name}.flags"
    values = parse_flagfile(path)
    method = name.split("-")[1]
    assert (values["method"], values["dataset"], values["backbone"]) == (method, dataset, backbone)
    assert values["cutmix_alpha"] == 1.0 and values["cutmix_prob"] == prob
    assert values["lambda_cls"] == (3.0 if name == "cub-cutmix_cskd" else 1.0)
    train._resolve(dict(values))  # pylint: disable=protected-access
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and "Yun et al., ICCV 2019" in lines[0]
    assert all(line.startswith(("#", "--")) for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cutmix", "cutmix_cskd"])
def test_trains_the_digits_demo_from_the_command_line(method, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "cskd_tf.train", f"--method={method}", "--epochs=3",
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["top1_error"] < 0.6  # Chance: 0.9.
