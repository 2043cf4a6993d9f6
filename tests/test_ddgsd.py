"""DDGSD: the self-partner views of pair_dataset and DDGSDModel's loss, against known answers."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from cskd_tf import backbones, data, losses
from cskd_tf.data import augment, pairs
from cskd_tf.ddgsd import DDGSDModel, linear_mmd

SHAPE, CLASSES = (4, 4, 1), 3
# Class 0 has five members, class 1 three, class 2 a single one.
LABELS = np.array([0, 1, 0, 2, 0, 1, 0, 1, 0], np.int64)


# --- Two views of one image -------------------------------------------------------


def test_self_partner_is_the_anchor_in_the_class_partners_anchor_order():
    by_self = pairs.pair_indices(LABELS, seed=3, partner="self")
    by_class = pairs.pair_indices(LABELS, seed=3)
    orders = []
    for _ in range(3):  # Each iteration is a new epoch.
        got = [tuple(map(int, p)) for p in by_self]
        assert [a for a, _ in got] == [p for _, p in got]
        assert sorted(a for a, _ in got) == list(range(len(LABELS)))
        assert [a for a, _ in got] == [int(a) for a, _ in by_class]
        orders.append([a for a, _ in got])
    assert orders[0] != orders[1]  # Anchors are still reshuffled every epoch.


def test_self_partner_without_augmentation_repeats_the_anchor_image():
    images = (np.arange(len(LABELS))[:, None, None, None] * np.ones((1, 3, 3, 1))).astype(np.uint8)
    ds = data.pair_dataset(images, LABELS, 4, seed=0, partner="self")
    seen = []
    for (x, x_pair), y in ds:
        np.testing.assert_array_equal(x.numpy(), x_pair.numpy())
        index = x.numpy()[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(LABELS[index], y.numpy())
        seen += list(index)
    assert sorted(seen) == list(range(len(LABELS)))


def test_self_partner_views_are_two_crops_of_the_same_image():
    # Distinct images; digits' augmentation is a random 8x8 crop of the image padded by 1.
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(len(LABELS), 8, 8, 1), dtype=np.uint8)
    aug = data.Augmenter("digits", seed=0)
    ds = data.pair_dataset(images, LABELS, len(LABELS), augment=aug.train, partner="self")
    (x, x_pair), y = next(iter(ds))
    mean, std = np.array(augment.DIGITS_MEAN), np.array(augment.DIGITS_STD)

    def crop_origin(view):
        pixels = np.round((view * std + mean) * 255)
        for index, image in enumerate(images):
            padded = np.pad(image, [(1, 1), (1, 1), (0, 0)]).astype(np.float32)
            for i in range(3):
                for j in range(3):
                    if np.allclose(pixels, padded[i : i + 8, j : j + 8], atol=0.5):
                        return index, (i, j)
        raise AssertionError("A view is no crop of any image.")

    origins = [(crop_origin(a), crop_origin(b)) for a, b in zip(x.numpy(), x_pair.numpy())]
    for ((image_a, _), (image_b, _)), label in zip(origins, y.numpy()):
        assert image_a == image_b and LABELS[image_a] == label
    # Two independent draws: the crops differ for most of the nine images.
    assert sum(a[1] != b[1] for a, b in origins) >= 3


def test_unknown_partner_names_the_choices():
    with pytest.raises(ValueError, match="expected one of: class, self"):
        pairs.pair_indices(LABELS, partner="other")
    with pytest.raises(ValueError, match="expected one of: class, self"):
        data.pair_dataset(np.zeros((len(LABELS), 2, 2, 1), np.uint8), LABELS, 4, partner="same")


# --- The loss terms ----------------------------------------------------------------


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get("mlp", CLASSES, SHAPE)


def identity_net(classes=5):
    """Inputs are the features and the logits: fixed logits go straight into the loss."""
    inputs = keras.Input((classes,))
    features = keras.layers.Identity(name="features")(inputs)
    logits = keras.layers.Dense(
        classes, kernel_initializer="identity", bias_initializer="zeros", name="logits"
    )(features)
    return keras.Model(inputs, logits)


def compiled(model, lr=0.1, **kwargs):
    model.compile(optimizer=keras.optimizers.SGD(lr), metrics=["accuracy"], **kwargs)
    return model


def views(n=8, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    draw = lambda: rng.normal(size=(n, *shape)).astype(np.float32)
    return draw(), draw(), rng.integers(0, CLASSES, size=n)


def fit_one_step(model, x_a, x_b, y):
    ds = tf.data.Dataset.from_tensors(((x_a, x_b), y))
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


def numpy_ce(logits, y):
    return -special.log_softmax(logits.astype(np.float64), axis=-1)[np.arange(len(y)), y]


def numpy_kl(target, logits, temperature):
    log_q = special.log_softmax(target.astype(np.float64) / temperature, axis=-1)
    log_p = special.log_softmax(logits.astype(np.float64) / temperature, axis=-1)
    return np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)


def test_without_the_regularisers_the_loss_is_the_two_views_cross_entropy():
    x_a, x_b, y = views()
    model = compiled(DDGSDModel(mlp(), lambda_consistency=0.0, lambda_mmd=0.0), lr=0.0)
    logits_a, logits_b = model.backbone(x_a).numpy(), model.backbone(x_b).numpy()
    history = fit_one_step(model, x_a, x_b, y)
    expected = numpy_ce(logits_a, y).mean() + numpy_ce(logits_b, y).mean()
    assert history["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert history["ce_loss"][0] == pytest.approx(expected, rel=1e-5)
    # Accuracy is counted on the first view.
    assert history["accuracy"][0] == pytest.approx(np.mean(logits_a.argmax(-1) == y))


def test_identical_views_give_twice_the_cross_entropy_and_zero_regularisers():
    # small_convnet has batch-norm: the same batch twice still gives the same statistics.
    x, _, y = views(shape=(8, 8, 1))
    keras.utils.set_random_seed(0)
    model = compiled(DDGSDModel(backbones.get("small_convnet", CLASSES, (8, 8, 1))), lr=0.0)
    logits = model.backbone(x, training=True).numpy()
    history = fit_one_step(model, x, x, y)
    assert history["consistency_loss"][0] == pytest.approx(0.0, abs=1e-6)
    assert history["mmd_loss"][0] == pytest.approx(0.0, abs=1e-9)
    assert history["loss"][0] == pytest.approx(2 * numpy_ce(logits, y).mean(), rel=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_terms_on_fixed_logits_equal_numpy(weighted):
    rng = np.random.default_rng(1)
    logits_a = rng.normal(scale=2.0, size=(6, 5)).astype(np.float32)
    logits_b = rng.normal(scale=2.0, size=(6, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=6)
    w = rng.uniform(0.2, 2.0, size=6).astype(np.float32) if weighted else np.ones(6, np.float32)
    model = compiled(DDGSDModel(identity_net(), temperature=3.0))
    terms, logits = model.compute_terms(
        logits_a, logits_b, y, sample_weight=w if weighted else None
    )
    np.testing.assert_allclose(logits.numpy(), logits_a, rtol=1e-6)
    # Keras' weighted mean divides by the batch size, not by the sum of the weights.
    ce = np.sum(w * (numpy_ce(logits_a, y) + numpy_ce(logits_b, y))) / 6
    kl = numpy_kl(logits_b, logits_a, 3.0) + numpy_kl(logits_a, logits_b, 3.0)
    consistency = 9.0 * np.sum(w * kl) / 6
    # The features are the logits; the means are weighted means.
    gap = (w[:, None] * (logits_a - logits_b)).sum(0) / w.sum()
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["consistency"]) == pytest.approx(consistency, rel=1e-5)
    assert float(terms["mmd"]) == pytest.approx(np.sum(gap**2), rel=1e-5)
    assert float(linear_mmd(logits_a, logits_b, w)) == pytest.approx(np.sum(gap**2), rel=1e-5)


def test_consistency_gradient_stops_at_the_targets():
    # With sg on the targets, d/dz_a of mean_i T^2 [KL(sg(p_b)||p_a) + KL(sg(p_a)||p_b)] is
    # only the first KL's: T (softmax(z_a/T) - softmax(z_b/T)) / n. Without it, the second KL
    # would add T * J_softmax(z_a/T) (log p_a - log p_b) / n as well.
    rng = np.random.default_rng(2)
    z_a = tf.constant(rng.normal(scale=2.0, size=(4, 5)).astype(np.float32))
    z_b = tf.constant(rng.normal(scale=2.0, size=(4, 5)).astype(np.float32))
    model = compiled(DDGSDModel(identity_net(), temperature=2.0))
    with tf.GradientTape() as tape:
        tape.watch([z_a, z_b])
        terms, _ = model.compute_terms(z_a, z_b, np.zeros(4, np.int64))
    grad_a, grad_b = tape.gradient(terms["consistency"], [z_a, z_b])
    p_a = special.softmax(z_a.numpy() / 2.0, axis=-1)
    p_b = special.softmax(z_b.numpy() / 2.0, axis=-1)
    np.testing.assert_allclose(grad_a.numpy(), 2.0 * (p_a - p_b) / 4, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_b.numpy(), 2.0 * (p_b - p_a) / 4, rtol=1e-5, atol=1e-7)
    # The weights see the same: logits = z K (K = I here), so dK = z_a^T dz_a + z_b^T dz_b.
    with tf.GradientTape() as tape:
        terms, _ = model.compute_terms(z_a, z_b, np.zeros(4, np.int64))
    kernel = model.backbone.get_layer("logits").kernel
    expected = z_a.numpy().T @ (2.0 * (p_a - p_b) / 4) + z_b.numpy().T @ (2.0 * (p_b - p_a) / 4)
    got = tape.gradient(terms["consistency"], kernel).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def objective(net, x_a, x_b, y, temperature, lambda_consistency, lambda_mmd):
    logits_a, features_a = backbones.feature_model(net)(x_a)
    logits_b, features_b = backbones.feature_model(net)(x_b)
    ce = keras.losses.sparse_categorical_crossentropy(y, logits_a, from_logits=True)
    ce += keras.losses.sparse_categorical_crossentropy(y, logits_b, from_logits=True)
    kl = losses.class_wise_kl(logits_a, logits_b, temperature)
    kl += losses.class_wise_kl(logits_b, logits_a, temperature)
    gap = tf.reduce_mean(features_a, 0) - tf.reduce_mean(features_b, 0)
    mmd = tf.reduce_sum(gap**2)
    return tf.reduce_mean(ce) + lambda_consistency * tf.reduce_mean(kl) + lambda_mmd * mmd


@pytest.mark.slow
def test_two_replicas_equal_one_device_and_the_objective_written_out():
    x_a, x_b, y = views(n=8)
    x_b = x_b + 1.0  # A large feature gap, so that the MMD term matters.
    hyper = {"temperature": 2.0, "lambda_consistency": 2.0, "lambda_mmd": 3.0}
    reference = mlp()
    with tf.GradientTape() as tape:
        loss = objective(reference, x_a, x_b, y, **hyper)
    grads = tape.gradient(loss, reference.trainable_weights)
    expected = [w.numpy() - 0.1 * g.numpy() for w, g in zip(reference.trainable_weights, grads)]

    single = compiled(DDGSDModel(mlp(), **hyper))
    history_1 = fit_one_step(single, x_a, x_b, y)
    for w, e in zip(single.backbone.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)
    assert history_1["loss"][0] == pytest.approx(float(loss), rel=1e-5)

    # Reduced through one device, not collectives: collective instance keys restart with every
    # strategy of a process and clash with those of strategies made by earlier tests.
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = compiled(DDGSDModel(mlp(), **hyper))
    history_2 = fit_one_step(mirrored, x_a, x_b, y)
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    for key in ("loss", "ce_loss", "consistency_loss", "mmd_loss", "accuracy"):
        assert history_2[key][0] == pytest.approx(history_1[key][0], rel=1e-5, abs=2e-6)

    # The test can tell: each replica's own MMD, averaged, is another number.
    _, f_a = backbones.feature_model(reference)(x_a)
    _, f_b = backbones.feature_model(reference)(x_b)
    per_replica = np.mean([float(linear_mmd(f_a[h], f_b[h])) for h in (slice(4), slice(4, 8))])
    assert per_replica != pytest.approx(float(linear_mmd(f_a, f_b)), rel=1e-2)


@pytest.mark.slow
def test_evaluate_and_predict_see_a_plain_classifier():
    x_a, x_b, y = views()
    model = compiled(DDGSDModel(mlp()))
    fit_one_step(model, x_a, x_b, y)
    np.testing.assert_allclose(model.predict(x_a, verbose=0), model.backbone(x_a), rtol=1e-6)
    plain = model.evaluate(x_a, y, verbose=0, return_dict=True)
    assert set(plain) == {"loss", "accuracy"}
    assert plain["loss"] == pytest.approx(numpy_ce(model.backbone(x_a).numpy(), y).mean(), 1e-5)
    paired = model.evaluate(
        tf.data.Dataset.from_tensors(((x_a, x_b), y)), verbose=0, return_dict=True
    )
    assert paired == pytest.approx(plain, rel=1e-6)  # On the first views only.


def test_mistakes_raise_one_sentence():
    for kwargs, name in [
        ({"temperature": 0.0}, "temperature"),
        ({"lambda_consistency": -1.0}, "lambda_consistency"),
        ({"lambda_mmd": -0.5}, "lambda_mmd"),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be"):
            DDGSDModel(mlp(), **kwargs)
    x_a, _, y = views()
    with pytest.raises(ValueError, match='partner="self"'):
        compiled(DDGSDModel(mlp())).fit(x_a, y, epochs=1, verbose=0)
    inputs = keras.Input((3,))
    no_features = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="no layer named 'features'"):
        DDGSDModel(no_features)


@pytest.mark.slow
def test_config_and_keras_file_round_trip(tmp_path):
    x_a, x_b, y = views()
    model = compiled(DDGSDModel(mlp(), temperature=3.0, lambda_consistency=0.5, lambda_mmd=2.0))
    fit_one_step(model, x_a, x_b, y)
    clone = DDGSDModel.from_config(model.get_config())
    assert (clone.temperature, clone.lambda_consistency, clone.lambda_mmd) == (3.0, 0.5, 2.0)
    path = str(tmp_path / "ddgsd.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DDGSDModel)
    assert (loaded.temperature, loaded.lambda_consistency, loaded.lambda_mmd) == (3.0, 0.5, 2.0)
    np.testing.assert_allclose(
        loaded.predict(x_a, verbose=0), model.predict(x_a, verbose=0), rtol=1e-6
    )
    # The reloaded model trains on: same step, same weights (like every Classifier, it is
    # reloaded uncompiled).
    fit_one_step(model, x_a, x_b, y)
    fit_one_step(compiled(loaded), x_a, x_b, y)
    for a, b in zip(model.backbone.weights, loaded.backbone.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mixed_float16_step_matches_float32():
    x_a, x_b, y = views()
    single = compiled(DDGSDModel(mlp()), lr=0.0)
    expected = fit_one_step(single, x_a, x_b, y)["loss"][0]
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compiled(DDGSDModel(mlp()), lr=0.0)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        history = fit_one_step(model, x_a, x_b, y)
        assert model.predict(x_a, verbose=0).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert history["loss"][0] == pytest.approx(expected, rel=1e-2)
