"""The backbones' building blocks: PyTorch's batch-norm update, padding and initialisers."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import saving
from cskd_tf.backbones import layers

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def bn(**kwargs):
    return layers.TorchBatchNormalization(
        momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON, **kwargs
    )


def test_moving_variance_is_updated_with_the_unbiased_variance_by_hand():
    # One channel holding 1, 2, 3, 4 (n = 4 values): mean 2.5, biased variance 1.25,
    # unbiased 5/3. From (mean 0, variance 1), PyTorch's momentum 0.1 gives
    # running_mean = 0.25 and running_var = 0.9 + 0.1 * 5/3 = 1.0666...; Keras' own layer
    # would give 0.9 + 0.1 * 1.25 = 1.025.
    layer = bn()
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1)
    y = layer(x, training=True)
    assert float(layer.moving_mean.numpy()[0]) == pytest.approx(0.25, rel=1e-6)
    assert float(layer.moving_variance.numpy()[0]) == pytest.approx(0.9 + 0.1 * 5 / 3, rel=1e-6)
    # The output is normalised with the biased variance, as in both frameworks.
    expected = (x - 2.5) / np.sqrt(1.25 + 1e-5)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5)
    # A second step from there: n = 2 values (3 and 5) in two examples.
    layer(np.array([3.0, 5.0], np.float32).reshape(2, 1, 1, 1), training=True)
    assert float(layer.moving_mean.numpy()[0]) == pytest.approx(0.9 * 0.25 + 0.1 * 4.0, rel=1e-6)
    assert float(layer.moving_variance.numpy()[0]) == pytest.approx(
        0.9 * (0.9 + 0.1 * 5 / 3) + 0.1 * 2.0, rel=1e-6
    )


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 6), (2, 7, 5, 3)])
def test_equals_keras_batch_norm_but_for_the_variance_correction(shape):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    ours, theirs = bn(), keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    for layer in (ours, theirs):
        layer.build(shape)
        layer.set_weights([w + 0.1 * i for i, w in enumerate(layer.get_weights())])
    np.testing.assert_allclose(
        ours(x, training=True), theirs(x, training=True), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(ours.moving_mean, theirs.moving_mean, rtol=1e-6)
    n = np.prod(shape[:-1])
    # Both start from a moving variance of 1.3: subtract the old part, compare the new.
    np.testing.assert_allclose(
        ours.moving_variance.numpy() - 0.9 * 1.3,
        (theirs.moving_variance.numpy() - 0.9 * 1.3) * n / (n - 1),
        rtol=1e-5,
    )
    # Inference uses the moving statistics alike.
    ours.moving_variance.assign(theirs.moving_variance)
    np.testing.assert_allclose(
        ours(x, training=False), theirs(x, training=False), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_values_per_channel_leave_the_statistics_alone(n):
    # An empty replica's share of a short last batch (Keras' layer would store NaN), or a
    # single value with no unbiased variance (PyTorch refuses it in training).
    layer = bn()
    layer.build((None, 1, 1, 2))
    before = [w.numpy().copy() for w in layer.weights]
    out = layer(np.ones((n, 1, 1, 2), np.float32), training=True)
    assert out.shape == (n, 1, 1, 2)
    for w, b in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_graph_xla_and_mixed_precision_update_alike():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    results = []
    for mode in ("eager", "graph", "xla", "mixed_float16"):
        layer = bn(dtype="mixed_float16" if mode == "mixed_float16" else None)
        layer.build(x.shape)
        step = lambda t, layer=layer: layer(t, training=True)
        if mode in ("graph", "xla"):
            step = tf.function(step, jit_compile=mode == "xla")
        out = step(tf.constant(x, tf.float16 if mode == "mixed_float16" else tf.float32))
        assert out.dtype == (tf.float16 if mode == "mixed_float16" else tf.float32)
        results.append((layer.moving_mean.numpy(), layer.moving_variance.numpy()))
        assert layer.moving_variance.dtype == "float32"
    for mean, variance in results[1:]:
        # float16 inputs round the statistics to about 1e-3.
        np.testing.assert_allclose(mean, results[0][0], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(variance, results[0][1], rtol=2e-3)


def test_keras_file_round_trip_keeps_the_class(tmp_path):
    inputs = keras.Input((2, 2, 3))
    model = keras.Model(inputs, layers.batch_norm(inputs, name="bn"))
    model(np.ones((2, 2, 2, 3), np.float32), training=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("bn"), layers.TorchBatchNormalization)
    assert loaded.get_layer("bn").get_config() == model.get_layer("bn").get_config()
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_keras_file_of_cskd_tf_0_1_loads_and_predicts_what_it_did():
    # Written by cskd_tf 0.1 (Keras' own batch-norm): a trained CSKDModel around the demo's
    # small_convnet, and its predictions on four probe images then.
    model = saving.load_model(FIXTURES / "cskd_tf-0.1-small_convnet.keras")
    probe = np.load(FIXTURES / "cskd_tf-0.1-small_convnet.npz")
    np.testing.assert_allclose(model.predict(probe["images"], verbose=0), probe["logits"], 1e-5)
    # It keeps the layer it was trained with (inference is the same for both classes).
    norm = model.backbone.get_layer("bn1")
    assert type(norm) is keras.layers.BatchNormalization  # pylint: disable=unidiomatic-typecheck
