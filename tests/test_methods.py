"""The other methods: their loss pieces, their composition in CSKDModel, their flags."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from cskd_tf import backbones
from cskd_tf import losses
from cskd_tf import methods
from cskd_tf import train
from cskd_tf.data import mixup
from cskd_tf.errors import UserError
from cskd_tf.model import CSKDModel

SHAPE, CLASSES = (4, 4, 1), 3


def random_logits(n=6, c=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(scale=2.0, size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)


# --- Loss pieces ------------------------------------------------------------------


def test_cross_entropy_without_smoothing_is_the_negative_log_likelihood():
    logits, labels = random_logits()
    expected = -special.log_softmax(logits.astype(np.float64), axis=-1)[np.arange(6), labels]
    np.testing.assert_allclose(losses.cross_entropy(logits, labels).numpy(), expected, rtol=1e-5)


def test_label_smoothing_by_hand():
    # Two classes, logits (0, 0): log p = (-ln 2, -ln 2) whatever the target: CE = ln 2.
    assert losses.cross_entropy([[0.0, 0.0]], [0], 0.3).numpy()[0] == pytest.approx(np.log(2))
    # Logits (ln 3, 0): p = (3/4, 1/4); eps = 0.2 gives the target (0.9, 0.1).
    got = losses.cross_entropy([[np.log(3.0), 0.0]], [0], 0.2).numpy()[0]
    assert got == pytest.approx(-(0.9 * np.log(0.75) + 0.1 * np.log(0.25)), rel=1e-6)
    # eps = 1: the uniform target, whatever the label.
    logits, labels = random_logits()
    uniform = -special.log_softmax(logits.astype(np.float64), axis=-1).mean(-1)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, 1.0), uniform, rtol=1e-5)


def test_soft_targets_give_the_mixture_of_the_two_cross_entropies():
    logits, labels = random_logits()
    other = (labels + 1) % 5
    soft = 0.3 * np.eye(5)[labels] + 0.7 * np.eye(5)[other]
    expected = 0.3 * losses.cross_entropy(logits, labels) + 0.7 * losses.cross_entropy(
        logits, other
    )
    np.testing.assert_allclose(losses.cross_entropy(logits, soft), expected, rtol=1e-5)


def test_entropy_limits():
    assert losses.entropy(np.zeros((1, 7), np.float32)).numpy()[0] == pytest.approx(np.log(7))
    assert losses.entropy([[1e4, 0.0, 0.0]]).numpy()[0] == pytest.approx(0.0, abs=1e-6)


def test_classification_loss_is_smoothed_ce_minus_beta_entropy_and_round_trips():
    logits, labels = random_logits()
    loss = losses.ClassificationLoss(label_smoothing=0.1, entropy_weight=0.5)
    per_example = losses.cross_entropy(logits, labels, 0.1) - 0.5 * losses.entropy(logits)
    assert float(loss(labels, logits)) == pytest.approx(float(np.mean(per_example)), rel=1e-5)
    # Keras hands losses float labels; those are still class ids.
    assert float(loss(labels.astype(np.float32), logits)) == pytest.approx(
        float(loss(labels, logits))
    )
    again = losses.ClassificationLoss.from_config(loss.get_config())
    assert (again.label_smoothing, again.entropy_weight) == (0.1, 0.5)


# --- Mixup ----------------------------------------------------------------------


def test_mix_batch_by_hand_and_lambda_one_is_the_identity():
    x = tf.constant([[1.0], [3.0]])
    labels = tf.constant([0, 1])
    mixed, soft = mixup.mix_batch(x, labels, 2, 0.25, tf.constant([1, 0]))
    np.testing.assert_allclose(mixed.numpy(), [[2.5], [1.5]])  # 0.25*1 + 0.75*3, ...
    np.testing.assert_allclose(soft.numpy(), [[0.25, 0.75], [0.75, 0.25]])
    same, hard = mixup.mix_batch(x, labels, 2, 1.0, tf.constant([1, 0]))
    np.testing.assert_allclose(same.numpy(), x.numpy())
    np.testing.assert_allclose(hard.numpy(), np.eye(2))


def fixed_pairs(n=8):
    x = np.arange(n, dtype=np.float32)[:, None]
    return tf.data.Dataset.from_tensor_slices(((x, x + 100.0), np.arange(n) % 3)).batch(4)


def test_mixup_mixes_partners_like_their_anchors_and_repeats_with_the_seed():
    first = list(mixup.mixup(fixed_pairs(), 3, alpha=1.0, seed=5).as_numpy_iterator())
    again = list(mixup.mixup(fixed_pairs(), 3, alpha=1.0, seed=5).as_numpy_iterator())
    for ((x, x_pair), soft), ((x2, _), soft2) in zip(first, again):
        np.testing.assert_allclose(x_pair, x + 100.0, rtol=1e-6)  # Same lam, same permutation.
        np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(soft, soft2)


@pytest.mark.slow
def test_mixup_lambda_follows_beta_alpha_alpha():
    # x = (0, 1): when the permutation swaps the two, the second mixed value is lam itself.
    ds = tf.data.Dataset.from_tensors((tf.constant([[0.0], [1.0]]), tf.constant([0, 1])))
    for alpha in (1.0, 0.2):
        draws = mixup.mixup(ds.repeat(4000), 2, alpha=alpha, seed=0)
        mixed = np.stack([x[:, 0] for x, _ in draws.as_numpy_iterator()])
        swapped = ~((mixed[:, 0] == 0.0) & (mixed[:, 1] == 1.0))
        lam = mixed[swapped, 1]
        assert 1500 < len(lam) < 2500  # Half the permutations of two swap them.
        # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
        assert lam.mean() == pytest.approx(0.5, abs=0.03)
        assert lam.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


def test_mixup_keyed_by_training_step_repeats_resumes_and_draws_beta():
    """`first_batch=k`, the mode training uses: batch i is keyed by step k + i, so iterating
    again gives the same batches and a dataset resumed at step k + j gives batch j's; each
    batch is `lam * v + (1 - lam) * v[permutation]` of its inputs, partners and one-hot
    labels, with one `lam ~ Beta(alpha, alpha)` per batch.

    Every batch's inputs are the rows of `eye(4)`, so a mixed row i is `lam` at i and
    `1 - lam` at `permutation[i]`: both can be read off it.

    Mutants run: (1) `tf.data.Dataset.counter(0)` for `counter(first_batch)` in
    `map_batches` (a resumed run re-draws the first steps' mixing): the resumed batches differ
    (`assert_array_equal(a, b)` in `assert_batches_equal` fails); (2) `draw` ignoring the
    batch's key (`tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])`): the same
    `lam` and permutation every batch, so repeating and resuming still agree, but
    `lams.mean() == approx(0.5, abs=0.03)` fails (0.22, one draw).
    """
    steps, eye, rows = 1500, np.eye(4), np.arange(4)
    x = np.tile(np.eye(4, dtype=np.float32), (steps, 1))
    y = np.tile(np.array([0, 1, 2, 0]), steps)
    ds = tf.data.Dataset.from_tensor_slices(((x, 10 * x), y)).batch(4)
    mixed = mixup.mixup(ds, 3, alpha=1.0, seed=5, first_batch=7)
    first = list(mixed.as_numpy_iterator())
    assert len(first) == steps

    def assert_batches_equal(got, want):
        for a, b in zip(tf.nest.flatten(list(got)), tf.nest.flatten(list(want))):
            np.testing.assert_array_equal(a, b)

    assert_batches_equal(mixed.take(20).as_numpy_iterator(), first[:20])  # Iterated again.
    for skip in (1, 9):  # A run resumed at step 7 + skip.
        resumed = mixup.mixup(ds.skip(skip), 3, alpha=1.0, seed=5, first_batch=7 + skip)
        assert_batches_equal(resumed.take(3).as_numpy_iterator(), first[skip : skip + 3])
    inputs = np.stack([b[0][0] for b in first]).astype(np.float64)  # [steps, 4, 4]
    partners = np.stack([b[0][1] for b in first])
    soft = np.stack([b[1] for b in first])
    diagonal = inputs[:, rows, rows]
    others = inputs.copy()
    others[:, rows, rows] = -1.0
    permutation = np.where(diagonal < 1 - 1e-6, others.argmax(-1), rows)
    moved = (permutation != rows).any(1)
    lam = np.where(moved, diagonal[np.arange(steps), (permutation != rows).argmax(1)], 1.0)
    lam_ = lam[:, None, None]
    np.testing.assert_allclose(inputs, lam_ * eye + (1 - lam_) * eye[permutation], atol=1e-6)
    np.testing.assert_allclose(partners, 10 * inputs, rtol=1e-6)
    one_hot = np.eye(3)[[0, 1, 2, 0]]
    np.testing.assert_allclose(soft, lam_ * one_hot + (1 - lam_) * one_hot[permutation],
                               atol=1e-6)  # fmt: skip
    lams = lam[moved]
    assert len(lams) > 0.9 * steps  # All but the identity permutations (1 in 24).
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(1 / 12, rel=0.1)  # Beta(1, 1): the uniform.


# --- Composition in CSKDModel --------------------------------------------------------


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get("mlp", CLASSES, SHAPE)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda: rng.normal(size=(n, *SHAPE)).astype(np.float32)  # noqa: E731
    return draw(), draw(), draw(), rng.integers(0, CLASSES, size=n)


def sgd_step(model, ds, lr=0.1):
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


def expected_weights(objective, lr=0.1):
    reference = mlp()
    with tf.GradientTape() as tape:
        loss = objective(reference)
    grads = tape.gradient(loss, reference.trainable_weights)
    return [w.numpy() - lr * g.numpy() for w, g in zip(reference.trainable_weights, grads)], loss


def assert_weights(model, expected):
    for w, e in zip(model.backbone.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)


def test_cskd_e_step_equals_its_objective_written_out():
    x, x_pair, x_clean, y = batch()

    def objective(net):
        logits = net(x)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        cls = losses.class_wise_kl(logits, net(x_pair), 4.0)
        sample = losses.class_wise_kl(logits, net(x_clean), 4.0)
        return tf.reduce_mean(ce) + 2.0 * tf.reduce_mean(cls) + 0.5 * tf.reduce_mean(sample)

    expected, loss = expected_weights(objective)
    model = CSKDModel(mlp(), temperature=4.0, lambda_cls=2.0, lambda_sample=0.5)
    ds = tf.data.Dataset.from_tensors(((x, x_pair, x_clean), y))
    history = sgd_step(model, ds)
    assert_weights(model, expected)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert set(history) == {"loss", "ce_loss", "cls_loss", "sample_loss"}


def test_iclr_sample_form_step_equals_its_objective_with_gradient_through_both_views():
    x, x_pair, x_clean, y = batch()

    def objective(net):
        logits = net(x)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        cls = losses.class_wise_kl(logits, net(x_pair), 4.0)
        # The submission's L_sam: KL(P(x_clean) || P(x_aug)) at T, no T^2, both differentiated.
        sample = losses.kl_divergence(net(x_clean), logits, 4.0)
        return tf.reduce_mean(ce) + tf.reduce_mean(cls) + 0.5 * tf.reduce_mean(sample)

    expected, loss = expected_weights(objective)
    model = CSKDModel(mlp(), temperature=4.0, lambda_sample=0.5, sample_form="iclr")
    history = sgd_step(model, tf.data.Dataset.from_tensors(((x, x_pair, x_clean), y)))
    assert_weights(model, expected)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert CSKDModel.from_config(model.get_config()).sample_form == "iclr"


def test_kl_divergence_by_hand_and_its_gradient_reaches_both_sides():
    # T = 1, target (ln 3, 0) -> q = (3/4, 1/4); logits (0, 0) -> p = (1/2, 1/2).
    expected = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    got = losses.kl_divergence([[np.log(3.0), 0.0]], [[0.0, 0.0]]).numpy()[0]
    assert got == pytest.approx(expected, rel=1e-6)
    # T^2 * KL at T with a fixed target is exactly class_wise_kl.
    logits, _ = random_logits()
    target, _ = random_logits(seed=1)
    np.testing.assert_allclose(
        16.0 * losses.kl_divergence(target, logits, 4.0),
        losses.class_wise_kl(logits, target, 4.0),
        rtol=1e-5,
    )
    target = tf.Variable(target)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(losses.kl_divergence(target, logits))
    assert np.abs(tape.gradient(value, target).numpy()).sum() > 0
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(losses.class_wise_kl(logits, target))
    assert tape.gradient(value, target) is None


def test_identical_views_give_a_zero_sample_wise_term():
    x, x_pair, _, y = batch()
    model = CSKDModel(
        mlp(), lambda_sample=1.0
    )  # The MLP has no batch-norm: same view, same logits.
    history = sgd_step(model, tf.data.Dataset.from_tensors(((x, x_pair, x), y)))
    assert history["sample_loss"][0] == pytest.approx(0.0, abs=1e-6)


def test_distillation_step_equals_its_objective_and_the_teacher_is_not_trained():
    x, x_pair, _, y = batch()
    teacher = mlp(seed=7)
    before = [w.numpy().copy() for w in teacher.weights]

    def objective(net):
        logits = net(x)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        kd = losses.class_wise_kl(logits, teacher(x), 2.0)
        cls = losses.class_wise_kl(logits, net(x_pair), 4.0)
        return 0.3 * tf.reduce_mean(ce) + 0.7 * tf.reduce_mean(kd) + tf.reduce_mean(cls)

    expected, loss = expected_weights(objective)
    model = CSKDModel(mlp(), teacher=teacher, kd_alpha=0.7, kd_temperature=2.0)
    history = sgd_step(model, tf.data.Dataset.from_tensors(((x, x_pair), y)))
    assert_weights(model, expected)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    for w, b in zip(teacher.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_distillation_alone_takes_plain_batches_and_saves_without_the_teacher(tmp_path):
    x, _, _, y = batch()

    def objective(net):
        logits = net(x)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return 0.5 * tf.reduce_mean(ce) + 0.5 * tf.reduce_mean(
            losses.class_wise_kl(logits, teacher(x), 4.0)
        )

    teacher = mlp(seed=3)
    expected, _ = expected_weights(objective)
    model = CSKDModel(mlp(), lambda_cls=0.0, teacher=teacher, kd_alpha=0.5)
    sgd_step(model, tf.data.Dataset.from_tensors((x, y)))
    assert_weights(model, expected)
    model.save(tmp_path / "student.keras")
    student = keras.models.load_model(tmp_path / "student.keras")
    assert student.teacher is None
    np.testing.assert_allclose(
        student.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )


def test_kd_with_alpha_zero_and_no_pairs_is_plain_cross_entropy():
    x, _, _, y = batch()

    def objective(net):
        return tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, net(x), from_logits=True)
        )

    expected, _ = expected_weights(objective)
    model = CSKDModel(mlp(), lambda_cls=0.0, teacher=mlp(seed=3), kd_alpha=0.0)
    sgd_step(model, tf.data.Dataset.from_tensors((x, y)))
    assert_weights(model, expected)


@pytest.mark.parametrize("name", ["adacos", "virtual_softmax"])
def test_head_model_step_trains_the_head_on_its_training_logits(name, tmp_path):
    from cskd_tf import heads  # pylint: disable=g-import-not-at-top
    from cskd_tf.model import HeadModel  # pylint: disable=g-import-not-at-top

    x, _, _, y = batch()
    keras.utils.set_random_seed(4)
    model = HeadModel(mlp(), heads.get(name, CLASSES))
    features = keras.Model(model.backbone.input, model.backbone.get_layer("features").output)
    # The reference step: a copy of the same weights, the same head call, by hand.
    reference = HeadModel(mlp(), heads.get(name, CLASSES))
    reference.set_weights(model.get_weights())
    ref_features = keras.Model(
        reference.backbone.input, reference.backbone.get_layer("features").output
    )
    with tf.GradientTape() as tape:
        logits = reference.head(ref_features(x), y, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    variables = reference.trainable_weights
    grads = tape.gradient(loss, variables)
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(variables, grads)]
    history = sgd_step(model, tf.data.Dataset.from_tensors((x, y)))
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    for w, e in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)
    # Prediction is the head's inference output on the features, C classes wide.
    inference = model.head(features(x)).numpy()
    np.testing.assert_allclose(model.predict(x, verbose=0), inference, rtol=1e-5, atol=1e-6)
    assert inference.shape == (8, CLASSES)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), inference, rtol=1e-5, atol=1e-6)


# --- The training command's methods ----------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher") / "run")
    train.run(dataset="digits", backbone="mlp", method="ce", epochs=1, batch_size=64,
              workdir=workdir, verbose=0)  # fmt: skip
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.names())
def test_every_method_trains_one_epoch(method, teacher_run, tmp_path):
    result = train.run(
        dataset="digits",
        backbone="small_convnet" if method == "byot" else "mlp",  # BYOT needs stages.
        method=method,
        epochs=1,
        batch_size=64,
        teacher=teacher_run if methods.get(method).teacher else None,
        workdir=str(tmp_path / method),
        verbose=0,
    )
    history = result["history"]
    assert np.isfinite(history["loss"][0]) and 0 <= history["accuracy"][0] <= 1
    assert ("sample_loss" in history) == (method in ("cskd_e", "cskd_sam"))
    assert ("kd_loss" in history) == method.startswith("kd")
    assert ("consistency_loss" in history) == (method == "ddgsd")
    assert ("aux_kd_loss" in history) == (method == "byot")
    plain = ("ce", "label_smoothing", "max_entropy", "mixup", "cutmix", "adacos", "virtual_softmax")
    assert ("ce_loss" in history) == (method not in plain)
    assert result["metrics"]["num_examples"] == 359


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="kd"), "--method=kd needs --teacher"),
        (dict(method="ce", teacher="{teacher}"), "--teacher is only used by --method=kd"),
        (dict(method="kd", teacher="{tmp}"), "is neither a .keras file"),
        (
            dict(method="kd", teacher="{tmp}/three_classes.keras"),
            "needs (8, 8, 1) to (10,)",
        ),  # fmt: skip
        (dict(label_smoothing=1.5), "--label_smoothing must be in [0, 1]"),
        (dict(mixup_alpha=0.0), "--mixup_alpha must be > 0"),
        (dict(kd_alpha=2.0), "--kd_alpha must be in [0, 1]"),
    ],
)
def test_method_mistakes_raise_one_sentence(teacher_run, tmp_path, kwargs, message):
    mlp(seed=1).save(tmp_path / "three_classes.keras")  # A teacher for another data set.
    kwargs = {k: v.format(teacher=teacher_run, tmp=tmp_path) if isinstance(v, str) else v
              for k, v in kwargs.items()}  # fmt: skip
    with pytest.raises(UserError, match=re.escape(message)):
        train.run(dataset="digits", backbone="mlp", workdir=str(tmp_path / "run"), **kwargs)
    assert not (tmp_path / "run").exists()
