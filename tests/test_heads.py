import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import heads

D, C = 6, 5


def two_replicas():
    """Two replicas on the two logical CPUs, reduced through one device: collectives would
    reuse instance keys that earlier tests' strategies used in this process, and abort."""
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def _rng(seed=0):
    return np.random.default_rng(seed)


def _data(seed=0, n=8):
    rng = _rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    w = rng.normal(size=(D, C)).astype(np.float32)
    y = rng.integers(0, C, size=n).astype(np.int32)
    return x, w, y


def _built(cls, w):
    layer = cls(C)
    layer.build((None, D))
    layer.kernel.assign(w)
    return layer


# Independent numpy versions of the two papers' formulas (float64).


def np_cosine(x, w):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=0, keepdims=True)
    return x @ w


def np_target_angles(x, w, y):
    cos = np_cosine(x, w)[np.arange(len(y)), y]
    return np.arccos(np.clip(cos, -1 + 1e-7, 1 - 1e-7))


def np_adacos_scale(x, w, y, s_old, median="lower"):
    """AdaCos eq. 15-16: log(B_avg) / cos(min(pi/4, theta_med))."""
    cos = np_cosine(x, w)
    n = len(y)
    non_target = np.ones_like(cos, dtype=bool)
    non_target[np.arange(n), y] = False
    b_avg = np.exp(s_old * cos[non_target]).sum() / n
    theta = np.sort(np_target_angles(x, w, y))
    theta_med = theta[(n - 1) // 2] if median == "lower" else theta[n // 2]
    return np.log(b_avg) / np.cos(min(np.pi / 4, theta_med))


def np_virtual_logits(x, w, y):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    virtual = np.linalg.norm(w[:, y], axis=0) * np.linalg.norm(x, axis=1)
    return np.concatenate([x @ w, virtual[:, None]], axis=1)


S0 = math.sqrt(2) * math.log(C - 1)


# AdaCos.


def test_adacos_initial_scale_is_the_fixed_adacos_scale():
    layer = _built(heads.AdaCosHead, _data()[1])
    assert layer.scale.trainable is False
    np.testing.assert_allclose(float(layer.scale.numpy()), S0, rtol=1e-6)


def test_adacos_inference_logits_are_scaled_cosines():
    x, w, y = _data()
    layer = _built(heads.AdaCosHead, w)
    logits = layer(x)
    assert logits.shape == (len(x), C)
    np.testing.assert_allclose(logits.numpy(), S0 * np_cosine(x, w), rtol=1e-5, atol=1e-5)
    # Labels change nothing at inference, and the scale is not updated.
    np.testing.assert_allclose(layer(x, labels=y, training=False).numpy(), logits.numpy())
    np.testing.assert_allclose(float(layer.scale.numpy()), S0, rtol=1e-6)


def test_adacos_logits_do_not_depend_on_feature_norm():
    x, w, _ = _data()
    layer = _built(heads.AdaCosHead, w)
    np.testing.assert_allclose(layer(7.0 * x).numpy(), layer(x).numpy(), rtol=1e-5, atol=1e-6)


def test_adacos_training_update_with_clip_active():
    # Random features: target angles near pi/2, so min(pi/4, theta_med) = pi/4.
    x, w, y = _data(seed=1, n=7)
    assert np.median(np_target_angles(x, w, y)) > np.pi / 4
    layer = _built(heads.AdaCosHead, w)
    logits = layer(x, labels=y, training=True)
    expected = np_adacos_scale(x, w, y, S0)
    np.testing.assert_allclose(float(layer.scale.numpy()), expected, rtol=1e-5)
    # The returned logits use the new scale.
    np.testing.assert_allclose(logits.numpy(), expected * np_cosine(x, w), rtol=1e-5, atol=1e-5)


def test_adacos_training_update_with_clip_inactive_and_lower_median():
    # Features close to their class weights: all target angles below pi/4, and an even batch
    # whose two middle angles differ, so the lower median is what decides the value.
    rng = _rng(2)
    _, w, _ = _data(seed=2)
    y = np.array([0, 1, 2, 3], np.int32)
    x = (w[:, y].T + 0.3 * rng.normal(size=(4, D))).astype(np.float32)
    theta = np.sort(np_target_angles(x, w, y))
    assert theta[-1] < np.pi / 4 and theta[2] - theta[1] > 1e-2
    layer = _built(heads.AdaCosHead, w)
    logits = layer(x, labels=y, training=True)
    expected = np_adacos_scale(x, w, y, S0, median="lower")
    upper = np_adacos_scale(x, w, y, S0, median="upper")
    assert abs(expected - upper) > 1e-3
    np.testing.assert_allclose(float(layer.scale.numpy()), expected, rtol=1e-5)
    np.testing.assert_allclose(logits.numpy(), expected * np_cosine(x, w), rtol=1e-5, atol=1e-5)


def test_adacos_second_step_starts_from_the_updated_scale():
    x, w, y = _data(seed=3, n=6)
    layer = _built(heads.AdaCosHead, w)
    layer(x, labels=y, training=True)
    layer(x[::-1], labels=y[::-1], training=True)
    s1 = np_adacos_scale(x, w, y, S0)
    np.testing.assert_allclose(float(layer.scale.numpy()), np_adacos_scale(x, w, y, s1), rtol=1e-5)
    # Inference then uses the stored scale.
    np.testing.assert_allclose(
        layer(x).numpy(), float(layer.scale.numpy()) * np_cosine(x, w), rtol=1e-5, atol=1e-5
    )


def test_adacos_no_gradient_through_the_scale():
    x, w, y = _data(seed=4)
    layer = _built(heads.AdaCosHead, w)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = layer(x, labels=y, training=True)
        loss = tf.reduce_sum(logits)
    grad_x, grad_w = tape.gradient(loss, [x, layer.kernel.value])
    # With the scale fixed at its new value, d sum(s cos) = s * d sum(cos).
    s = tf.constant(float(layer.scale.numpy()))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = s * tf.reduce_sum(layer(x) / layer.scale)
    ref_x, ref_w = tape.gradient(loss, [x, layer.kernel.value])
    np.testing.assert_allclose(grad_x.numpy(), ref_x.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_w.numpy(), ref_w.numpy(), rtol=1e-4, atol=1e-6)


def test_adacos_empty_batch_keeps_the_scale():
    _, w, _ = _data()
    layer = _built(heads.AdaCosHead, w)
    layer(np.zeros((0, D), np.float32), labels=np.zeros((0,), np.int32), training=True)
    np.testing.assert_allclose(float(layer.scale.numpy()), S0, rtol=1e-6)


def test_adacos_scale_is_the_replica_mean_under_mirrored_strategy():
    x, w, y = _data(seed=5, n=8)
    strategy = two_replicas()
    with strategy.scope():
        layer = _built(heads.AdaCosHead, w)

    def shard(ctx):
        i = ctx.replica_id_in_sync_group
        return x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]

    @tf.function
    def step(batch):
        return layer(batch[0], labels=batch[1], training=True)

    strategy.run(step, args=(strategy.experimental_distribute_values_from_function(shard),))
    per_replica = [np_adacos_scale(x[:4], w, y[:4], S0), np_adacos_scale(x[4:], w, y[4:], S0)]
    assert abs(per_replica[0] - per_replica[1]) > 1e-2
    expected = np.mean(per_replica)
    np.testing.assert_allclose(float(layer.scale.numpy()), expected, rtol=1e-5)


def test_adacos_needs_three_classes():
    with pytest.raises(ValueError, match="num_classes >= 3"):
        heads.AdaCosHead(2)


# Virtual-softmax.


def test_virtual_softmax_inference_logits_are_linear():
    x, w, y = _data()
    layer = _built(heads.VirtualSoftmaxHead, w)
    logits = layer(x)
    assert logits.shape == (len(x), C)
    np.testing.assert_allclose(logits.numpy(), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x, labels=y).numpy(), logits.numpy())
    assert len(layer.weights) == 1  # No bias.


def test_virtual_softmax_training_adds_the_virtual_logit():
    x, w, y = _data(seed=1)
    layer = _built(heads.VirtualSoftmaxHead, w)
    logits = layer(x, labels=y, training=True).numpy()
    assert logits.shape == (len(x), C + 1)
    np.testing.assert_allclose(logits, np_virtual_logits(x, w, y), rtol=1e-5, atol=1e-5)
    # [batch, 1] labels give the same.
    np.testing.assert_allclose(layer(x, labels=y[:, None], training=True).numpy(), logits)


def test_virtual_logit_is_at_least_the_target_logit():
    # Cauchy-Schwarz: ||W_y|| ||x|| >= W_y . x, with equality for x parallel to W_y.
    x, w, y = _data(seed=6, n=64)
    x[:4] = 3.0 * w[:, y[:4]].T
    layer = _built(heads.VirtualSoftmaxHead, w)
    logits = layer(x, labels=y, training=True).numpy()
    target = logits[np.arange(len(y)), y]
    assert np.all(logits[:, C] >= target - 1e-5 * np.abs(target))
    np.testing.assert_allclose(logits[:4, C], target[:4], rtol=1e-5)


def test_virtual_logit_gradient_flows_through_both_norms():
    # d(||W_y|| ||x||)/dx = ||W_y|| x / ||x||; d/dW_y = ||x|| W_y / ||W_y||.
    x, w, y = _data(seed=7, n=5)
    y = np.array([0, 1, 1, 3, 4], np.int32)
    layer = _built(heads.VirtualSoftmaxHead, w)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        virtual = layer(xt, labels=y, training=True)[:, C]
        loss = tf.reduce_sum(virtual)
    grad_x, grad_w = tape.gradient(loss, [xt, layer.kernel.value])
    x_norm = np.linalg.norm(x, axis=1, keepdims=True)
    w_norm = np.linalg.norm(w, axis=0, keepdims=True)
    np.testing.assert_allclose(grad_x.numpy(), w_norm[0, y][:, None] * x / x_norm, rtol=1e-5)
    expected_w = np.zeros_like(w)
    for i, label in enumerate(y):
        expected_w[:, label] += x_norm[i, 0] * w[:, label] / w_norm[0, label]
    np.testing.assert_allclose(grad_w.numpy(), expected_w, rtol=1e-5, atol=1e-6)


def test_virtual_class_changes_the_cross_entropy_gradient():
    x, w, y = _data(seed=8)
    layer = _built(heads.VirtualSoftmaxHead, w)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    xt = tf.constant(x)

    def grad(training):
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = ce(y, layer(xt, labels=y, training=training))
        return tape.gradient(loss, xt).numpy()

    virtual, plain = grad(True), grad(False)
    assert np.all(np.isfinite(virtual))
    assert np.abs(virtual - plain).max() > 1e-3


# Both heads.

HEADS = [heads.AdaCosHead, heads.VirtualSoftmaxHead]


@pytest.mark.parametrize("cls", HEADS)
def test_config_round_trip(cls):
    layer = cls(C, name="head")
    clone = cls.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.num_classes == C and clone.name == "head"
    x, w, _ = _data()
    a = _built(cls, w)
    b = cls.from_config(a.get_config())
    b.build((None, D))
    b.set_weights(a.get_weights())
    np.testing.assert_allclose(b(x).numpy(), a(x).numpy())


@pytest.mark.parametrize("cls", HEADS)
def test_save_and_load_in_a_functional_model(cls, tmp_path):
    x, w, y = _data(seed=9)
    inputs = keras.Input((D,))
    head = cls(C, name="head")
    model = keras.Model(inputs, head(inputs))
    head.kernel.assign(w)
    if cls is heads.AdaCosHead:
        head(x, labels=y, training=True)  # A scale other than the initial one must survive.
        assert abs(float(head.scale.numpy()) - S0) > 1e-3
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("head"), cls)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("cls", HEADS)
def test_float16_features_give_float32_logits(cls):
    x, w, _ = _data()
    x16 = x.astype(np.float16)
    expected = _built(cls, w)(x16.astype(np.float32)).numpy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = _built(cls, w)
        logits = layer(tf.constant(x16))
    finally:
        keras.config.set_dtype_policy("float32")
    assert logits.dtype == tf.float32
    assert layer.kernel.dtype == "float32"
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-6)


def test_get():
    assert isinstance(heads.get("adacos", C), heads.AdaCosHead)
    head = heads.get("virtual_softmax", C, kernel_initializer="zeros")
    assert isinstance(head, heads.VirtualSoftmaxHead)
    head.build((None, D))
    np.testing.assert_array_equal(head.kernel.numpy(), np.zeros((D, C)))
    with pytest.raises(ValueError, match="adacos.*virtual_softmax"):
        heads.get("nope", 3)
