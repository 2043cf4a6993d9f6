"""`--method=ps_kd`: PS-KD's targets by hand, its table of predictions, its pipeline and configs."""

import os
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from scipy import special

from cskd_tf import backbones
from cskd_tf import losses
from cskd_tf import methods
from cskd_tf import train
from cskd_tf.data import pairs
from cskd_tf.errors import UserError
from cskd_tf.methods import ps_kd
from cskd_tf.model import ObjectiveModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE, CLASSES = (4, 4, 1), 3
OPTIONS = dict(ps_kd_alpha=0.8, ps_kd_top_k=0)
CONTEXT = dict(train_size=6, epochs=4, steps_per_epoch=2)


def build(options=None, context=None, lr=0.1, strategy=None, seed=0):
    with (strategy or tf.distribute.get_strategy()).scope():
        keras.utils.set_random_seed(seed)
        model = ObjectiveModel(
            backbones.get("mlp", CLASSES, SHAPE),
            "ps_kd",
            {**OPTIONS, **(options or {})},
            {**CONTEXT, **(context or {})},
        )
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=losses.ClassificationLoss())
    return model


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def distributions(n, seed=1):
    return special.softmax(np.random.default_rng(seed).normal(scale=2.0, size=(n, CLASSES)), -1)


def expected_loss(logits, labels, stored, alpha):
    """PS-KD's CE by hand: unwritten (zero) rows stand for the one-hot label."""
    one_hot = np.eye(CLASSES)[labels]
    previous = np.where(stored.sum(-1, keepdims=True) > 0, stored, one_hot)
    target = (1 - alpha) * one_hot + alpha * previous
    return float(np.mean(-(target * special.log_softmax(np.float64(logits), -1)).sum(-1)))


def plain_ce(logits, labels):
    log_p = special.log_softmax(np.float64(logits), -1)
    return float(np.mean(-log_p[np.arange(len(labels)), labels]))


def with_table(model, rows, steps):
    table = np.zeros((CONTEXT["train_size"], CLASSES), np.float32)
    table[: len(rows)] = rows
    model.ps_kd_predictions.assign(table)
    model.ps_kd_steps.assign(steps)
    return table


# --- The objective ------------------------------------------------------------------


def test_objective_and_table_update_by_hand():
    model = build()
    table = with_table(model, distributions(4), steps=3)  # Epoch 1 of 4: alpha = 0.8 * 2 / 4.
    x, index, y = images(4), np.array([5, 1, 3, 4]), np.array([0, 2, 1, 1])  # Rows 4, 5 unwritten.
    objective = model.compute_objective((x, index), y, None)
    logits = objective["logits"].numpy()
    np.testing.assert_allclose(logits, model.backbone(x).numpy(), rtol=1e-6, atol=1e-6)
    want = expected_loss(logits, y, table[index], alpha=0.4)
    assert float(objective["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(objective["parts"]["ce_loss"]) == pytest.approx(want, rel=1e-5)
    model.reduce_objective(objective)
    # The training pass's softmax goes into the rows of this batch; the others stay.
    after = model.ps_kd_predictions.numpy()
    np.testing.assert_array_equal(after[index], tf.nn.softmax(logits).numpy())
    np.testing.assert_allclose(after[index], special.softmax(np.float64(logits), -1), atol=1e-6)
    np.testing.assert_array_equal(after[[0, 2]], table[[0, 2]])
    assert int(model.ps_kd_steps.numpy()) == 4


@pytest.mark.parametrize("steps,epoch", [(0, 0), (1, 0), (2, 1), (5, 2), (7, 3), (8, 4), (99, 49)])
def test_alpha_grows_linearly_with_the_epoch_as_the_authors_code(steps, epoch):
    # alpha_t = alpha_T * (epoch + 1) / end_epoch, epoch counted from 0; alpha_T from the last
    # epoch on (a run fitted longer than planned keeps a target that sums to 1).
    model = build()
    model.ps_kd_steps.assign(steps)
    want = 0.8 * min(epoch + 1, CONTEXT["epochs"]) / CONTEXT["epochs"]
    assert float(ps_kd.alpha(model)) == pytest.approx(want, rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy():
    model = build(dict(ps_kd_alpha=0.0))
    with_table(model, distributions(6), steps=7)  # A full table, late in training.
    x, index, y = images(5), np.array([0, 1, 2, 3, 5]), np.array([0, 1, 2, 0, 1])
    objective = model.compute_objective((x, index), y, None)
    want = plain_ce(objective["logits"].numpy(), y)
    assert float(objective["loss"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("alpha_t", [0.5, 1.0])
def test_the_first_epoch_is_plain_cross_entropy(alpha_t):
    # The authors' table starts as the one-hot labels: (1 - a) y + a y = y, whatever a.
    model = build(dict(ps_kd_alpha=alpha_t))
    x, index, y = images(4), np.array([0, 1, 2, 3]), np.array([2, 1, 0, 2])
    objective = model.compute_objective((x, index), y, None)
    want = plain_ce(objective["logits"].numpy(), y)
    assert float(objective["loss"]) == pytest.approx(want, rel=1e-5)


def test_a_fit_step_is_the_objective_written_out():
    model = build()
    table = with_table(model, distributions(6), steps=6)  # Epoch 3 of 4: alpha = 0.8.
    x, index, y = images(4), np.array([4, 0, 2, 5]), np.array([1, 0, 2, 2])
    target = 0.2 * np.eye(CLASSES)[y] + 0.8 * table[index]
    reference = build()
    with tf.GradientTape() as tape:
        logits = reference.backbone(x, training=True)
        loss = tf.reduce_mean(tf.reduce_sum(-target * tf.nn.log_softmax(logits), -1))
    grads = tape.gradient(loss, reference.trainable_weights)
    expected = [w.numpy() - 0.1 * g.numpy() for w, g in zip(reference.trainable_weights, grads)]
    history = model.fit(
        tf.data.Dataset.from_tensors(((x, index), y)), epochs=1, verbose=0, shuffle=False
    ).history
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    for w, e in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)
    # The table holds the step's own predictions, from the weights before the update.
    stored = model.ps_kd_predictions.numpy()[index]
    np.testing.assert_allclose(stored, tf.nn.softmax(logits).numpy(), rtol=1e-6, atol=1e-7)
    assert int(model.ps_kd_steps.numpy()) == 7


@pytest.mark.parametrize("top_k", [0, 2])
def test_the_table_after_two_epochs_is_the_hand_computation(top_k):
    # With lr = 0 the predictions are fixed: after epoch 0 the table is softmax(f(x)) of every
    # example (its top 2, renormalised), and epoch 1's loss is the CE against
    # 0.2 y + 0.8 p (alpha_1 = 0.8 * 2 / 2) over all five examples.
    n, batch = 5, 2
    x, y = images(n, seed=3), np.array([0, 1, 2, 1, 0])
    context = dict(train_size=n, epochs=2, steps_per_epoch=3)
    model = build(dict(ps_kd_top_k=top_k), context, lr=0.0)
    ds = pairs.example_dataset(x, y, batch, seed=4, shuffle=True, epochs=range(2), indices=True)
    history = model.fit(ds, epochs=1, steps_per_epoch=6, verbose=0).history
    logits = model.backbone(x).numpy()
    p = special.softmax(np.float64(logits), -1)
    if top_k:
        p = np.where(p >= np.sort(p, -1)[:, -top_k:-top_k + 1], p, 0.0)
        p /= p.sum(-1, keepdims=True)
    stored = ps_kd.expand([v.value for v in ps_kd.table(model)], CLASSES).numpy()
    np.testing.assert_allclose(stored, p, rtol=1e-5, atol=1e-6)
    assert int(model.ps_kd_steps.numpy()) == 6
    # fit's one "epoch" is both: the mean of the two epochs' per-example losses.
    first, second = plain_ce(logits, y), expected_loss(logits, y, p, alpha=0.8)
    assert history["loss"][0] == pytest.approx((first + second) / 2, rel=1e-5)


def test_a_saved_model_keeps_its_table(tmp_path):
    model = build(dict(ps_kd_top_k=2))
    x, index, y = images(3), np.array([0, 4, 5]), np.array([0, 1, 2])
    model.fit(tf.data.Dataset.from_tensors(((x, index), y)), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert [w.path for w in again.weights] == [w.path for w in model.weights]
    for a, b in zip(again.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_a_sparse_compiled_loss_is_refused_with_one_sentence():
    model = build()
    model.compile(optimizer="sgd")  # Classifier's default: sparse CE, which takes no soft target.
    with pytest.raises(ValueError, match="compile with loss=cskd_tf.losses.ClassificationLoss"):
        model.compute_objective((images(2), np.array([0, 1])), np.array([0, 1]), None)


# --- Storage ------------------------------------------------------------------------


def test_top_k_is_exact_with_every_class_and_off_by_twice_the_tail_otherwise():
    p = distributions(50, seed=5).astype(np.float32)
    for k in (CLASSES, 2, 1):
        q = ps_kd.expand(ps_kd.compress(tf.constant(p), k), CLASSES).numpy()
        np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(q.argmax(-1), p.argmax(-1))
        tail = 1.0 - np.sort(p, -1)[:, -k:].sum(-1)
        # L1(q, p) = (1/s - 1) s + (1 - s) = 2 (1 - s), s the mass kept.
        np.testing.assert_allclose(np.abs(q - p).sum(-1), 2 * tail, atol=2e-6)
    # K = 0 and K >= C keep the full float32 distribution: bit-exact.
    for k in (0, CLASSES, 10):
        assert ps_kd._top_k(dict(ps_kd_top_k=k), CLASSES) is None  # pylint: disable=W0212
    np.testing.assert_array_equal(ps_kd.expand(ps_kd.compress(tf.constant(p), None), CLASSES), p)


def test_an_imagenet_sized_table_needs_top_k():
    imagenet = methods.Context("imagenet", "resnet50", 1000, (224, 224, 3), 1_281_167, 90, 5005)
    assert ps_kd.table_bytes(1_281_167, 1000) == 5_124_668_000  # float32: 5.1 GB.
    assert ps_kd.table_bytes(1_281_167, 1000, 10) == 102_493_360  # Top 10: 102 MB.
    with pytest.raises(UserError, match="pass --ps_kd_top_k=10"):
        ps_kd.check(dict(ps_kd_top_k=0), imagenet)
    ps_kd.check(dict(ps_kd_top_k=10), imagenet)
    cifar = methods.Context("cifar100", "preact_resnet18", 100, (32, 32, 3), 50_000, 200, 391)
    ps_kd.check(dict(ps_kd_top_k=0), cifar)  # 20 MB.


# --- The pipeline -------------------------------------------------------------------


def noisy(image, seed):
    return tf.cast(image, tf.float32) + tf.random.stateless_uniform(tf.shape(image), seed)


def test_indexed_examples_are_the_plain_ones_with_their_index():
    x, y = (np.arange(7 * 4 * 4).reshape(7, 4, 4, 1) % 255).astype(np.uint8), np.arange(7) % 3
    common = dict(seed=2, augment=noisy, shuffle=True, epochs=range(1, 3), skip=1)
    plain = list(pairs.example_dataset(x, y, 3, **common))
    indexed = list(pairs.example_dataset(x, y, 3, indices=True, **common))
    assert len(plain) == len(indexed) == 5
    for (a, ya), ((b, index), yb) in zip(plain, indexed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(y[index.numpy()], yb)
        np.testing.assert_array_equal(np.floor(b.numpy()), x[index.numpy()])  # noise < 1
    seen = np.concatenate([index.numpy() for (_, index), _ in indexed[2:]])
    assert sorted(seen) == list(range(7))  # Epoch 2 holds every example once.


def test_a_stream_numbers_its_examples_in_its_fixed_order():
    x = (np.arange(6)[:, None, None, None] * np.ones((6, 2, 2, 1))).astype(np.uint8)
    y = np.arange(6)
    stream = tf.data.Dataset.from_tensor_slices((x, y))
    ds = pairs.example_dataset(stream, None, 4, kind="pixels", shuffle=True, epochs=range(1),
                               shuffle_buffer=6, indices=True)  # fmt: skip
    batches = [((a.numpy(), i.numpy()), b.numpy()) for (a, i), b in ds]
    index = np.concatenate([i for (_, i), _ in batches])
    assert sorted(index) == list(range(6)) and list(index) != list(range(6))
    for (a, i), b in batches:
        np.testing.assert_array_equal(b, y[i])
        np.testing.assert_array_equal(a, x[i].astype(np.float32))


def test_the_training_batches_of_ps_kd_carry_indices():
    from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top

    split = sources.Split(np.zeros((5, 4, 4, 1), np.uint8), np.arange(5) % 2, "pixels")

    class Augmenter:  # pylint: disable=too-few-public-methods
        train = staticmethod(noisy)

    ds = pairs.training_dataset(split, methods.get("ps_kd").batches, 2, 0, Augmenter(), range(1))
    (x, index), y = next(iter(ds))
    assert x.shape == (2, 4, 4, 1) and index.dtype == tf.int64 and y.shape == (2,)


def test_indices_are_for_single_examples():
    with pytest.raises(ValueError, match="single examples"):
        methods.Batches(partner="class", indices=True)
    with pytest.raises(ValueError, match="do not combine"):
        methods.Batches(indices=True, previous=True)


# --- Replicas -----------------------------------------------------------------------


def two_replicas():
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [0, 2])
def test_two_replicas_hold_one_devices_table(top_k):
    # Two epochs of batches of 4 (2 + 2), 3 (2 + 1) and 1 (1 + 0): every replica applies every
    # replica's rows, the second epoch reads them, and the weights, the table and the logs are
    # one device's.
    n = 8
    x, y = images(n, seed=6), np.random.default_rng(7).integers(0, CLASSES, n)
    batches = []
    for epoch in range(2):
        order = np.random.default_rng(epoch).permutation(n)
        for lo, hi in ((0, 4), (4, 7), (7, 8)):
            i = order[lo:hi]
            batches.append(((x[i], i.astype(np.int64)), y[i]))

    def dataset():
        ds = tf.data.Dataset.from_tensors(batches[0])
        for b in batches[1:]:
            ds = ds.concatenate(tf.data.Dataset.from_tensors(b))
        return ds

    context = dict(train_size=n, epochs=2, steps_per_epoch=3)
    single = build(dict(ps_kd_top_k=top_k), context)
    history_1 = single.fit(dataset(), epochs=1, verbose=0).history
    mirrored = build(dict(ps_kd_top_k=top_k), context, strategy=two_replicas())
    history_2 = mirrored.fit(dataset(), epochs=1, verbose=0).history
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    for variable in mirrored.non_trainable_weights:
        first, second = (v.numpy() for v in variable.value.values)
        np.testing.assert_array_equal(first, second)
    assert np.count_nonzero(ps_kd.table(single)[0].numpy().sum(-1)) == n
    for key, value in history_1.items():
        assert history_2[key][0] == pytest.approx(value[0], rel=1e-5, abs=1e-6), key


# --- Configs ------------------------------------------------------------------------


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


@pytest.mark.parametrize("name", ["cifar100-ps_kd.flags", "cub-ps_kd.flags"])
def test_paper_style_configs_parse_and_name_known_things(name):
    from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top

    path = ROOT / "configs" / "methods" / name
    values = parse_flagfile(path)
    assert values["method"] == "ps_kd" and values["ps_kd_alpha"] == 0.8
    assert values["dataset"] == name.split("-")[0] and values["dataset"] in sources.names()
    assert values["backbone"] in backbones.names()
    resolve = train._resolve  # pylint: disable=protected-access
    config, method = resolve({**train.defaults(), **values})
    assert method.name == "ps_kd" and config["epochs"] >= 1
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# PS-KD") and lines[0].endswith(".")
    first_flag = next(line for line in lines if not line.startswith("#"))
    assert first_flag == "--flagfile=configs/base.flags"
