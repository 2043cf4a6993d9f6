"""`zipf_ls` (Zipf's LS, Liang et al., ECCV 2022): ranks, dense votes, its KL and its step."""

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
from scipy import special
from scipy import stats

from cskd_tf import backbones
from cskd_tf import methods
from cskd_tf import train
from cskd_tf.errors import UserError
from cskd_tf.methods import zipf_ls

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = 4


def context(num_classes=CLASSES, shape=(4, 4, 1)):
    return methods.Context(
        dataset="test", backbone="mlp", num_classes=num_classes, input_shape=shape,
        train_size=8, epochs=1, steps_per_epoch=1,
    )  # fmt: skip


def options(**given):
    values = {name: flag.default for name, flag in zipf_ls.FLAGS.items()}
    values.update(given)
    return values


def numpy_ranks(scores, labels, form):
    """Zipf ranks of the non-target classes with scipy's rankdata, as the authors' code."""
    ranks = []
    for row, label in zip(np.asarray(scores, np.float64), labels):
        others = np.delete(np.arange(len(row)), label)
        pool = row[others] if form == "paper" else row
        rank = stats.rankdata(-pool, method="min")
        ranks.append(rank if form == "paper" else rank[others])
    return np.array(ranks, np.float64)


def numpy_zipf_kl(logits, labels, scores, power, form):
    ranks = numpy_ranks(scores, labels, form)
    target = ranks**-power / (ranks**-power).sum(-1, keepdims=True)
    others = np.array([np.delete(r, y) for r, y in zip(np.asarray(logits, np.float64), labels)])
    return (target * (np.log(target) - special.log_softmax(others, axis=-1))).sum(-1)


# --- Ranks and the Zipf target, by hand ------------------------------------------------------


def test_non_target_index():
    index = zipf_ls.non_target_index(tf.constant([0, 2, 3]), 4).numpy()
    np.testing.assert_array_equal(index, [[1, 2, 3], [0, 1, 3], [0, 1, 2]])


def test_ranks_by_hand_and_unvoted_classes_share_the_next_rank():
    votes = tf.constant([[5.0, 3.0, 0.0, 0.0], [5.0, 0.0, 3.0, 1.0]])
    labels = tf.constant([1, 1])
    # Non-target classes 0, 2, 3. Paper: ranked among themselves; the two unvoted share 2.
    np.testing.assert_array_equal(zipf_ls.zipf_ranks(votes, labels), [[1, 2, 2], [1, 2, 3]])
    # Code: ranked among all four, the target (3 votes, second) included, then dropped.
    np.testing.assert_array_equal(zipf_ls.zipf_ranks(votes, labels, "code"), [[1, 3, 3], [1, 2, 3]])


@pytest.mark.parametrize("form", ["paper", "code"])
def test_ranks_equal_scipy_rankdata_min_on_random_ties(form):
    rng = np.random.default_rng(0)
    votes = rng.integers(0, 4, size=(64, 10)).astype(np.float32)  # Many ties.
    labels = rng.integers(0, 10, size=64)
    got = zipf_ls.zipf_ranks(votes, labels, form).numpy()
    np.testing.assert_array_equal(got, numpy_ranks(votes, labels, form))


def test_zipf_kl_by_hand():
    logits = np.array([[1.0, 2.0, -0.5, 0.3]], np.float32)
    votes, labels = np.array([[5.0, 3.0, 0.0, 0.0]]), np.array([1])
    q = special.softmax(np.array([1.0, -0.5, 0.3]))  # Classes 0, 2, 3, renormalised.
    for form, target in (("paper", [0.5, 0.25, 0.25]), ("code", [0.6, 0.2, 0.2])):
        expected = np.sum(np.array(target) * np.log(np.array(target) / q))
        got = zipf_ls.zipf_kl(logits, labels, votes, 1.0, form).numpy()[0]
        assert got == pytest.approx(expected, rel=1e-5), form


@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("power", [0.0, 1.0, 2.5])
def test_zipf_kl_equals_numpy_on_random_logits(form, power):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(16, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=16)
    got = zipf_ls.zipf_kl(logits, labels, logits, power, form).numpy()
    np.testing.assert_allclose(got, numpy_zipf_kl(logits, labels, logits, power, form), rtol=1e-4)


def test_power_zero_is_a_uniform_target_over_the_non_target_classes():
    logits, labels = np.array([[0.0, 4.0, 1.0]], np.float32), np.array([0])
    uniform = -np.log(2.0) - special.log_softmax(np.array([4.0, 1.0])).mean()
    assert zipf_ls.zipf_kl(logits, labels, logits, 0.0).numpy()[0] == pytest.approx(uniform)


# --- Dense votes -------------------------------------------------------------------------------


def test_dense_votes_by_hand():
    feature_map = np.array([[[[3.0, 0.0], [0.0, 2.0]], [[0.1, 0.2], [1.0, 0.4]]]], np.float32)
    kernel = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    bias = np.array([0.0, 0.0, 0.5], np.float32)
    # Positions' logits: (3, 0, .5) -> 0; (0, 2, .5) -> 1; (.1, .2, .5) -> 2; (1, .4, .5) -> 0.
    votes = zipf_ls.dense_votes(feature_map, kernel, bias).numpy()
    np.testing.assert_array_equal(votes, [[2.0, 1.0, 1.0]])


def torch_bilinear_upsample(a, factor):
    """PyTorch's `upsample(mode="bilinear", align_corners=False)`, NHWC, written out."""

    def axis(n):
        src = np.maximum((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), n - 1)
        high = np.minimum(low + 1, n - 1)
        return low, high, src - low

    (y0, y1, wy), (x0, x1, wx) = axis(a.shape[1]), axis(a.shape[2])
    rows = a[:, y0] * (1 - wy)[None, :, None, None] + a[:, y1] * wy[None, :, None, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


def test_upsampled_votes_equal_pytorch_bilinear_votes():
    rng = np.random.default_rng(2)
    feature_map = rng.normal(size=(3, 3, 3, 4))
    kernel, bias = rng.normal(size=(4, 5)), rng.normal(size=5)
    logits = torch_bilinear_upsample(feature_map, 2) @ kernel + bias
    expected = np.eye(5)[logits.argmax(-1)].sum(axis=(1, 2))
    got = zipf_ls.dense_votes(feature_map.astype(np.float32), kernel, bias, upsample=2).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.sum(-1).tolist() == [36.0] * 3  # 6 x 6 positions each.


def test_upsampling_default_follows_the_input_size():
    assert zipf_ls.upsample_factor(options(), (32, 32, 3)) == 2
    assert zipf_ls.upsample_factor(options(), (224, 224, 3)) == 1
    assert zipf_ls.upsample_factor(options(zipf_ls_upsample=3), (224, 224, 3)) == 3


# --- The training step -----------------------------------------------------------------------


def make(backbone, shape, **given):
    spec = methods.get("zipf_ls")
    values = options(**given)
    spec.check(values, context(shape=shape))
    return spec.make_model(backbone, values, context(shape=shape))


def net(name, shape, seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get(name, CLASSES, shape)


def batch(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, CLASSES, size=n)


def sgd_step(model, ds, lr=0.1):
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


def assert_step(model, reference, objective, x, y, lr=0.1):
    """One SGD step of `model` equals the written-out `objective` on `reference`."""
    with tf.GradientTape() as tape:
        loss = objective()
    grads = tape.gradient(loss, reference.trainable_weights)
    expected = [w.numpy() - lr * g.numpy() for w, g in zip(reference.trainable_weights, grads)]
    history = sgd_step(model, tf.data.Dataset.from_tensors((x, y)), lr)
    for w, e in zip(model.backbone.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert set(history) == {"loss", "ce_loss", "zipf_loss"}
    return history


def ce(y, logits):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def kl_to(target, logits, y):
    """Mean `KL(target || softmax of the non-target logits)`, `target` fixed `[batch, C - 1]`."""
    mask = tf.cast(1 - tf.one_hot(y, CLASSES), tf.bool)
    others = tf.reshape(tf.boolean_mask(logits, mask), [-1, CLASSES - 1])
    log_q = tf.nn.log_softmax(others)
    return tf.reduce_mean(tf.reduce_sum(target * (np.log(target) - log_q), -1))


@pytest.mark.parametrize("form", ["paper", "code"])
def test_logit_ranked_step_equals_the_objective_written_out(form):
    shape = (4, 4, 1)
    x, y = batch(shape)
    reference = net("mlp", shape)

    def objective():
        logits = reference(x)
        ranks = numpy_ranks(logits.numpy(), y, form)  # The same pass ranks, without gradient.
        target = (1 / ranks) / (1 / ranks).sum(-1, keepdims=True)
        return ce(y, logits) + 0.5 * kl_to(target.astype(np.float32), logits, y)

    model = make(net("mlp", shape), shape, zipf_ls_lambda=0.5, zipf_ls_form=form)
    assert not hasattr(model, "_zipf_dense")  # mlp has no spatial map: the logits rank.
    history = assert_step(model, reference, objective, x, y)
    assert history["loss"][0] == pytest.approx(
        history["ce_loss"][0] + 0.5 * history["zipf_loss"][0], rel=1e-5
    )


def test_dense_ranked_step_with_batch_norm_equals_the_objective_written_out():
    shape = (8, 8, 1)
    x, y = batch(shape)
    reference = net("small_convnet", shape)
    both = keras.Model(reference.input, [reference.get_layer("features").input, reference.output])
    head = reference.get_layer("logits")

    def objective():
        feature_map, logits = both(x, training=True)  # One pass, batch statistics.
        dense = torch_bilinear_upsample(feature_map.numpy().astype(np.float64), 2)
        votes = np.eye(CLASSES)[(dense @ head.kernel.numpy() + head.bias.numpy()).argmax(-1)]
        ranks = numpy_ranks(votes.sum(axis=(1, 2)), y, "paper")
        target = (1 / ranks) / (1 / ranks).sum(-1, keepdims=True)
        return ce(y, logits) + 0.1 * kl_to(target.astype(np.float32), logits, y)

    model = make(net("small_convnet", shape), shape)
    assert hasattr(model, "_zipf_dense")  # Unset rank: dense for a pooled spatial map.
    assert_step(model, reference, objective, x, y)


def test_lambda_zero_is_plain_cross_entropy():
    shape = (4, 4, 1)
    x, y = batch(shape)
    reference = net("mlp", shape)
    model = make(net("mlp", shape), shape, zipf_ls_lambda=0.0)
    assert_step(model, reference, lambda: ce(y, reference(x)), x, y)


@pytest.mark.slow
def test_saved_dense_model_reloads_as_the_same_classifier(tmp_path):
    shape = (8, 8, 1)
    x, y = batch(shape)
    model = make(net("small_convnet", shape), shape)
    sgd_step(model, tf.data.Dataset.from_tensors((x, y)))
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert len(again.weights) == len(model.weights)  # The feature-map model adds none.
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_mistakes_raise_one_sentence():
    with pytest.raises(UserError, match="--zipf_ls_rank must be one of dense, logits"):
        zipf_ls.check(options(zipf_ls_rank="votes"), context())
    with pytest.raises(UserError, match="--zipf_ls_form must be one of paper, code"):
        zipf_ls.check(options(zipf_ls_form="megengine"), context())
    with pytest.raises(UserError, match="at least 2 classes"):
        zipf_ls.check(options(), context(num_classes=1))
    with pytest.raises(UserError, match="pass --zipf_ls_rank=logits"):
        make(net("mlp", (4, 4, 1)), (4, 4, 1), zipf_ls_rank="dense")


def two_replicas():
    # Reduced through one device: collectives would reuse instance keys of earlier strategies.
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


@pytest.mark.slow
def test_uneven_and_empty_replica_shares_equal_one_device():
    shape = (4, 4, 1)
    rng = np.random.default_rng(3)
    sizes = [4, 3, 1]  # Shares 2 + 2, 2 + 1 and 1 + 0.
    data = [(rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, CLASSES, n))
            for n in sizes]  # fmt: skip
    ds = tf.data.Dataset.from_tensors(data[0])
    for b in data[1:]:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(b))
    models = []
    for strategy in (tf.distribute.get_strategy(), two_replicas()):
        with strategy.scope():
            model = make(net("mlp", shape), shape, zipf_ls_lambda=0.7)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
        models.append((model, model.fit(ds, epochs=1, verbose=0, shuffle=False).history))
    (one, h1), (two, h2) = models
    for u, v in zip(one.weights, two.weights):
        np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-5, atol=1e-6)
    for key in h1:
        assert h2[key][0] == pytest.approx(h1[key][0], rel=1e-5), key


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
    "name,dataset,backbone,classes,weight",
    [("cifar100-zipf_ls", "cifar100", "preact_resnet18", 100, 0.1),
     ("cub-zipf_ls", "cub", "resnet18", 200, 1.0)],
)  # fmt: skip
def test_flagfiles_parse_and_name_known_things(name, dataset, backbone, classes, weight):
    path = ROOT / "configs" / "methods" / f"{name}.flags"
    values = parse_flagfile(path)
    named = (values["method"], values["dataset"], values["backbone"])
    assert named == ("zipf_ls", dataset, backbone)
    assert values["zipf_ls_lambda"] == weight and values["zipf_ls_rank"] == "dense"
    config, method = train._resolve(dict(values))  # pylint: disable=protected-access
    method.check(config, context(classes))
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and "Liang et al." in lines[0]
    assert all(line.startswith(("#", "--")) for line in lines)


@pytest.mark.slow
def test_trains_the_digits_demo_from_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "cskd_tf.train", "--method=zipf_ls", "--epochs=3",
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "zipf_ls" and metrics["top1_error"] < 0.5  # Chance: 0.9.
