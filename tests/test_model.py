import keras
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import backbones
from cskd_tf import losses
from cskd_tf.model import CSKDModel

SHAPE = (4, 4, 1)
CLASSES = 3


def two_replicas():
    """Two replicas on the two logical CPUs, reduced through one device: collectives would
    reuse instance keys that earlier tests' strategies used in this process, and abort."""
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    x_pair = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=n).astype(np.int64)
    return x, x_pair, y


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get("mlp", CLASSES, SHAPE)


def compiled(model, lr=0.1, **kwargs):
    model.compile(optimizer=keras.optimizers.SGD(lr), metrics=["accuracy"], **kwargs)
    return model


def fit_one_step(model, x, x_pair, y):
    ds = tf.data.Dataset.from_tensors(((x, x_pair), y))
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


def test_one_step_equals_the_objective_written_out():
    x, x_pair, y = batch()
    model = compiled(CSKDModel(mlp(), temperature=2.0, lambda_cls=3.0))
    reference = mlp()  # Same seed: same initial weights.
    with tf.GradientTape() as tape:
        logits = reference(x)
        pair_logits = reference(x_pair)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        kl = losses.class_wise_kl(logits, pair_logits, 2.0)
        loss = tf.reduce_mean(ce) + 3.0 * tf.reduce_mean(kl)
    grads = tape.gradient(loss, reference.trainable_weights)
    expected = [w.numpy() - 0.1 * g.numpy() for w, g in zip(reference.trainable_weights, grads)]

    history = fit_one_step(model, x, x_pair, y)
    for w, e in zip(model.backbone.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert history["ce_loss"][0] == pytest.approx(float(tf.reduce_mean(ce)), rel=1e-5)
    assert history["cls_loss"][0] == pytest.approx(float(tf.reduce_mean(kl)), rel=1e-5)
    # Accuracy is counted on the anchors.
    accuracy = np.mean(np.argmax(logits.numpy(), -1) == y)
    assert history["accuracy"][0] == pytest.approx(accuracy)


def test_lambda_zero_is_cross_entropy_training():
    x, x_pair, y = batch()
    cskd = compiled(CSKDModel(mlp(), lambda_cls=0.0))
    plain = mlp()
    plain.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    fit_one_step(cskd, x, x_pair, y)
    plain.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    for a, b in zip(cskd.backbone.weights, plain.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_two_replicas_equal_one_device():
    x, x_pair, y = batch(n=8)
    single = compiled(CSKDModel(mlp(), temperature=4.0, lambda_cls=2.0))
    history_1 = fit_one_step(single, x, x_pair, y)

    strategy = two_replicas()
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        # fit builds the compiled metrics under the strategy: on the anchors, not on (x, x_pair).
        mirrored = compiled(CSKDModel(mlp(), temperature=4.0, lambda_cls=2.0))
    history_2 = fit_one_step(mirrored, x, x_pair, y)

    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    for key in ("loss", "ce_loss", "cls_loss"):
        # Absolute slack: float32 rounding of log-probabilities near 1.1 is ~1e-7.
        assert history_2[key][0] == pytest.approx(history_1[key][0], rel=1e-5, abs=2e-6)


def test_partner_pass_runs_in_training_mode_after_the_anchors():
    # Dense(identity) -> BatchNorm: after one step the moving mean has seen the
    # anchor batch first, then the partners, as in the authors' train.py (Keras:
    # m <- 0.9 m + 0.1 batch_mean). The other order gives 0.9 * 0.1 * x_pair + 0.1 * x.
    inputs = keras.Input((2,))
    h = keras.layers.Dense(2, use_bias=False, kernel_initializer="identity", trainable=False)(
        inputs
    )
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")(h)
    net = keras.Model(inputs, keras.layers.Dense(CLASSES)(h))
    model = compiled(CSKDModel(net), lr=0.0)
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    x_pair = np.array([[10.0, 20.0], [30.0, 40.0]], np.float32)
    fit_one_step(model, x, x_pair, np.array([0, 1]))
    moving_mean = net.get_layer("bn").moving_mean.numpy()
    expected = 0.9 * (0.1 * x.mean(0)) + 0.1 * x_pair.mean(0)
    np.testing.assert_allclose(moving_mean, expected, rtol=1e-5)


def test_evaluate_and_predict_take_plain_inputs():
    x, x_pair, y = batch()
    model = compiled(CSKDModel(mlp()))
    fit_one_step(model, x, x_pair, y)
    np.testing.assert_allclose(model.predict(x, verbose=0), model.backbone(x).numpy(), rtol=1e-6)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"}
    ce = keras.losses.sparse_categorical_crossentropy(y, model.backbone(x), from_logits=True)
    assert logs["loss"] == pytest.approx(float(np.mean(ce)), rel=1e-5)


def test_fit_without_pairs_says_what_to_do():
    x, _, y = batch()
    model = compiled(CSKDModel(mlp()))
    with pytest.raises(ValueError, match="pair_dataset"):
        model.fit(x, y, epochs=1, verbose=0)


def test_rejects_bad_hyper_parameters():
    with pytest.raises(ValueError, match="temperature"):
        CSKDModel(mlp(), temperature=0.0)
    with pytest.raises(ValueError, match="lambda_cls"):
        CSKDModel(mlp(), lambda_cls=-1.0)


def test_config_and_keras_file_round_trip(tmp_path):
    x, x_pair, y = batch()
    model = compiled(CSKDModel(mlp(), temperature=3.0, lambda_cls=0.5))
    fit_one_step(model, x, x_pair, y)
    clone = CSKDModel.from_config(model.get_config())
    assert (clone.temperature, clone.lambda_cls) == (3.0, 0.5)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, CSKDModel)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_jit_compiled_step_equals_eager_graph_step():
    x, x_pair, y = batch()
    plain = compiled(CSKDModel(mlp()))
    jitted = compiled(CSKDModel(mlp()), jit_compile=True)
    h1 = fit_one_step(plain, x, x_pair, y)
    h2 = fit_one_step(jitted, x, x_pair, y)
    assert h2["loss"][0] == pytest.approx(h1["loss"][0], rel=1e-5)
    for a, b in zip(plain.weights, jitted.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_mixed_float16_step_is_finite():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, x_pair, y = batch()
        net = backbones.get("small_convnet", CLASSES, SHAPE)
        model = compiled(CSKDModel(net))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        history = fit_one_step(model, x, x_pair, y)
        assert model.predict(x, verbose=0).dtype == np.float32
        assert np.isfinite(history["loss"][0]) and history["cls_loss"][0] >= 0
    finally:
        keras.mixed_precision.set_global_policy("float32")
