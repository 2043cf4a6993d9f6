"""`--method=dlb`: DLB's objective by hand, its stored logits, its pipeline, replicas, configs."""

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
from cskd_tf.data import sources
from cskd_tf.errors import UserError
from cskd_tf.methods import dlb
from cskd_tf.model import ObjectiveModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE, CLASSES = (4, 4, 1), 3
OPTIONS = dict(dlb_temperature=3.0, dlb_alpha=1.0)
CONTEXT = dict(train_size=8, epochs=1, steps_per_epoch=2)  # At most 8 examples a batch.


def build(options=None, context=None, lr=0.1, strategy=None, seed=0):
    with (strategy or tf.distribute.get_strategy()).scope():
        keras.utils.set_random_seed(seed)
        model = ObjectiveModel(
            backbones.get("mlp", CLASSES, SHAPE),
            "dlb",
            {**OPTIONS, **(options or {})},
            {**CONTEXT, **(context or {})},
        )
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=losses.ClassificationLoss())
    return model


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


def batch(p, c, positions=None, seed=0):
    """A batch of `p` previous rows (at `positions`, default 0..p-1) then `c` current ones."""
    rng = np.random.default_rng(seed + 1)
    positions = np.arange(p) if positions is None else np.asarray(positions)
    x = images(p + c, seed)
    position = np.concatenate([positions, np.arange(c)]).astype(np.int64)
    previous = np.arange(p + c) < p
    return (x, position, previous), rng.integers(0, CLASSES, p + c)


def expected(logits, labels, p, kept, temperature=3.0, alpha=1.0):
    """DLB by hand: CE over all rows, alpha T^2 batchmean KL(softmax(kept/T) || softmax(z/T))."""
    logits = np.float64(logits)
    ce = np.mean(-special.log_softmax(logits, -1)[np.arange(len(labels)), labels])
    if not p:
        return ce, ce, 0.0
    log_q = special.log_softmax(np.float64(kept) / temperature, -1)
    log_p = special.log_softmax(logits[:p] / temperature, -1)
    kl = temperature**2 * np.mean((np.exp(log_q) * (log_q - log_p)).sum(-1))
    return ce + alpha * kl, ce, kl


def step(model, x, y):
    """compute_objective then reduce_objective, as the shared step runs them."""
    return model.reduce_objective(model.compute_objective(x, y, None))


def stored_logits(model, seed=9):
    table = np.random.default_rng(seed).normal(scale=2.0, size=(8, CLASSES)).astype(np.float32)
    model.dlb_logits.assign(table)
    return table


# --- The objective ------------------------------------------------------------------


def test_objective_and_stored_logits_by_hand():
    model = build()
    table = stored_logits(model)
    x, y = batch(3, 4, positions=[4, 0, 2])
    logits = model.backbone(x[0]).numpy()
    objective = step(model, x, y)
    loss, ce, kl = expected(logits, y, 3, table[[4, 0, 2]])
    assert kl > 0
    assert float(objective["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(objective["parts"]["ce_loss"]) == pytest.approx(ce, rel=1e-5)
    assert float(objective["parts"]["dlb_loss"]) == pytest.approx(kl, rel=1e-5)
    np.testing.assert_allclose(objective["logits"], logits, rtol=1e-6, atol=1e-6)
    # This step's logits (its current rows) replace the stored ones at their places.
    after = model.dlb_logits.numpy()
    np.testing.assert_array_equal(after[:4], objective["logits"].numpy()[3:])
    np.testing.assert_array_equal(after[4:], table[4:])


def test_the_first_step_of_a_run_is_plain_cross_entropy():
    model = build()
    stored_logits(model)
    x, y = batch(0, 5)
    objective = step(model, x, y)
    logits = model.backbone(x[0]).numpy()
    plain = np.mean(-special.log_softmax(np.float64(logits), -1)[np.arange(5), y])
    assert float(objective["loss"]) == pytest.approx(plain, rel=1e-5)
    assert float(objective["parts"]["dlb_loss"]) == 0.0


def test_alpha_zero_is_cross_entropy_on_both_batches():
    model = build(dict(dlb_alpha=0.0))
    stored_logits(model)
    x, y = batch(4, 2)
    logits = model.backbone(x[0]).numpy()
    objective = step(model, x, y)
    both = np.mean(-special.log_softmax(np.float64(logits), -1)[np.arange(6), y])
    assert float(objective["loss"]) == pytest.approx(both, rel=1e-5)
    assert float(objective["parts"]["dlb_loss"]) > 0  # Logged, not added.


def test_identical_logits_give_no_distillation():
    model = build()
    x, y = batch(3, 3)
    model.dlb_logits.assign(np.pad(model.backbone(x[0][:3]).numpy(), [[0, 5], [0, 0]]))
    objective = step(model, x, y)
    assert float(objective["parts"]["dlb_loss"]) == pytest.approx(0.0, abs=1e-6)


def reference_run(model_seed, batches, lr=0.1, temperature=3.0, alpha=1.0):
    """DLB written out: plain backbone, a tape, the previous step's logits kept by hand."""
    keras.utils.set_random_seed(model_seed)
    net = backbones.get("mlp", CLASSES, SHAPE)
    kept, losses_, counts = None, [], []
    for (x, position, previous), y in batches:
        x, position, previous, y = (np.asarray(v) for v in (x, position, previous, y))
        p = int(previous.sum())
        with tf.GradientTape() as tape:
            current = net(x[p:], training=True)
            logits = tf.concat([net(x[:p], training=True), current], 0) if p else current
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            if p:
                q = tf.nn.softmax(tf.gather(kept, position[:p]) / temperature)
                log_p = tf.nn.log_softmax(logits[:p] / temperature)
                kl = tf.reduce_sum(q * (tf.math.log(q) - log_p), -1)
                loss += alpha * temperature**2 * tf.reduce_mean(kl)
        grads = tape.gradient(loss, net.trainable_weights)
        for w, g in zip(net.trainable_weights, grads):
            w.assign(w - lr * g)
        kept = current.numpy()[np.argsort(position[p:])]
        losses_.append(float(loss))
        counts.append(len(y))
    return net, kept, float(np.average(losses_, weights=counts))


@pytest.mark.slow
def test_fit_through_the_pipeline_is_dlb_written_out():
    # 5 examples in batches of 2 over two epochs: steps of 0 + 2, 2 + 2, 2 + 1, then (the
    # previous epoch's last batch carried over) 1 + 2, 2 + 2, 2 + 1 rows.
    x = np.random.default_rng(2).integers(0, 255, (5, *SHAPE)).astype(np.uint8)
    y = np.arange(5) % 3
    scaled = lambda image, seed: noisy(image, seed) / 255.0  # noqa: E731
    ds = pairs.previous_batch_dataset(x, y, 2, seed=3, augment=scaled, epochs=range(2))
    batches = list(ds)
    assert [int(b[0][2].numpy().sum()) for b in batches] == [0, 2, 2, 1, 2, 2]
    model = build(context=dict(train_size=5, steps_per_epoch=3))
    history = model.fit(ds, epochs=1, verbose=0).history
    net, kept, mean_loss = reference_run(0, batches)
    for w, e in zip(model.trainable_weights, net.trainable_weights):
        np.testing.assert_allclose(w.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.dlb_logits.numpy()[: len(kept)], kept, rtol=1e-5, atol=1e-6)
    assert history["loss"][0] == pytest.approx(mean_loss, rel=1e-5)


def test_a_saved_model_keeps_its_logits(tmp_path):
    model = build()
    x, y = batch(2, 3)
    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    for a, b in zip(again.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_stored_logits_hold_the_largest_batch():
    # steps = ceil(n / B) bounds B by ceil(n / (steps - 1)); one step holds all n.
    for n in range(1, 120):
        for b in range(1, n + 3):
            steps = -(-n // b)
            rows = dlb.rows(dict(train_size=n, steps_per_epoch=steps))
            assert min(b, n) <= rows <= n
            assert rows <= min(b, n) + -(-min(b, n) // max(steps - 1, 1)) + 1
    assert dlb.rows(dict(train_size=50_000, steps_per_epoch=391)) == 129  # CIFAR, B = 128.


# --- The pipeline -------------------------------------------------------------------


def noisy(image, seed):
    return tf.cast(image, tf.float32) + tf.random.stateless_uniform(tf.shape(image), seed)


def rows_of(element):
    (x, position, previous), y = (tuple(v.numpy() for v in element[0]), element[1].numpy())
    p = int(previous.sum())
    assert not previous[p:].any()  # The previous step's rows come first.
    return x, position, p, y


def test_this_steps_rows_are_the_cross_entropy_batches_and_the_previous_rows_follow():
    x = (np.arange(7 * 2 * 2).reshape(7, 2, 2, 1) * 3 % 251).astype(np.uint8)
    y = np.arange(7) % 3
    common = dict(seed=5, augment=noisy, epochs=range(3))
    plain = list(pairs.example_dataset(x, y, 3, shuffle=True, **common))
    dlb_batches = [rows_of(e) for e in pairs.previous_batch_dataset(x, y, 3, **common)]
    assert len(plain) == len(dlb_batches) == 9
    for k, ((a, ya), (images_, position, p, labels)) in enumerate(zip(plain, dlb_batches)):
        # This step's rows: exactly the cross-entropy baseline's batch.
        np.testing.assert_array_equal(images_[p:], a)
        np.testing.assert_array_equal(labels[p:], ya)
        np.testing.assert_array_equal(position[p:], np.arange(len(ya)))
        if k == 0:  # The run's first step has no previous rows.
            assert p == 0
            continue
        before, y_before = plain[k - 1]
        # The previous step's examples, in its order, under another view (across epochs too).
        assert p == len(y_before)
        np.testing.assert_array_equal(labels[:p], y_before)
        np.testing.assert_array_equal(position[:p], np.arange(p))
        np.testing.assert_array_equal(np.floor(images_[:p]), np.floor(before.numpy()))
        assert not np.array_equal(images_[:p], before.numpy())


@pytest.mark.parametrize("epochs,skip", [(range(1, 3), 0), (range(1, 3), 2), (range(2, 3), 1)])
def test_a_resumed_range_gives_the_uninterrupted_batches(epochs, skip):
    x, y = (np.arange(7 * 4).reshape(7, 2, 2, 1) % 251).astype(np.uint8), np.arange(7) % 2
    full = [rows_of(e) for e in pairs.previous_batch_dataset(x, y, 3, seed=1, augment=noisy,
                                                             epochs=range(3))]  # fmt: skip
    part = [rows_of(e) for e in pairs.previous_batch_dataset(x, y, 3, seed=1, augment=noisy,
                                                             epochs=epochs, skip=skip)]  # fmt: skip
    start = epochs.start * 3 + skip
    assert len(part) == len(full) - start
    for a, b in zip(full[start:], part):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_a_stream_cannot_give_the_previous_steps_examples():
    stream = sources.StreamSplit(lambda: tf.data.Dataset.from_tensor_slices(([b""], [0])), 1)

    class Augmenter:  # pylint: disable=too-few-public-methods
        train = staticmethod(noisy)

    with pytest.raises(UserError, match="random access"):
        pairs.training_dataset(stream, methods.get("dlb").batches, 1, 0, Augmenter(), range(1))
    with pytest.raises(ValueError, match="range"):
        pairs.previous_batch_dataset(np.zeros((2, 1)), np.zeros(2), 1)


def test_previous_is_for_single_examples():
    with pytest.raises(ValueError, match="single examples"):
        methods.Batches(partner="self", previous=True)


# --- Replicas -----------------------------------------------------------------------


def two_replicas():
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


@pytest.mark.slow
def test_two_replicas_train_as_one_device_with_uneven_and_empty_shares():
    # (previous, current) rows per step, split over two replicas into contiguous shares:
    # 1 row (1 + 0: the second replica empty), 4 (p c | c c), 5 (p p p | c c: one replica
    # with previous rows only, the other with current ones only), 4 (p p | c c), 3 (p p | c).
    plan = [(0, 1), (1, 3), (3, 2), (2, 2), (2, 1)]
    batches = [batch(p, c, seed=k) for k, (p, c) in enumerate(plan)]

    def dataset():
        ds = tf.data.Dataset.from_tensors(batches[0])
        for b in batches[1:]:
            ds = ds.concatenate(tf.data.Dataset.from_tensors(b))
        return ds

    context = dict(train_size=3, steps_per_epoch=1)
    single = build(context=context)
    history_1 = single.fit(dataset(), epochs=1, verbose=0).history
    mirrored = build(context=context, strategy=two_replicas())
    history_2 = mirrored.fit(dataset(), epochs=1, verbose=0).history
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    first, second = (v.numpy() for v in mirrored.dlb_logits.value.values)
    np.testing.assert_array_equal(first, second)
    for key, value in history_1.items():
        assert history_2[key][0] == pytest.approx(value[0], rel=1e-5, abs=1e-6), key
    assert history_1["dlb_loss"][0] > 0


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


@pytest.mark.parametrize("name", ["cifar100-dlb.flags", "cub-dlb.flags"])
def test_paper_style_configs_parse_and_name_known_things(name):
    path = ROOT / "configs" / "methods" / name
    values = parse_flagfile(path)
    assert values["method"] == "dlb"
    assert values["dlb_temperature"] == 3.0 and values["dlb_alpha"] == 1.0
    assert values["dataset"] == name.split("-")[0] and values["dataset"] in sources.names()
    assert values["backbone"] in backbones.names()
    resolve = train._resolve  # pylint: disable=protected-access
    config, method = resolve({**train.defaults(), **values})
    assert method.name == "dlb" and config["epochs"] >= 1
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# DLB") and lines[0].endswith(".")
    first_flag = next(line for line in lines if not line.startswith("#"))
    assert first_flag == "--flagfile=configs/base.flags"
