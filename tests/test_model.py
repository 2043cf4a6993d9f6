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


@pytest.mark.slow
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


def test_mixed_float16_step_moves_the_weights_as_the_float32_step():
    """One step of lr 0.1 under mixed_float16 changes every weight as the float32 step does,
    to the precision of float16 arithmetic (a few percent of the change).

    Mutant run: `scaled_loss = loss` instead of `self.optimizer.scale_loss(loss)` in
    `Classifier.train_step` (the LossScaleOptimizer then divides unscaled gradients by its
    2^15 scale, and training stalls): `test_mixed_float16_step_is_finite` passes, and here the
    change of the weights is 1/32768 of the float32 one, so the relative error of the update
    is 0.99997 (`relative(flat(change_16), flat(change_32)) < 0.1` fails).
    """
    shape = (8, 8, 1)
    rng = np.random.default_rng(0)
    x, x_pair = (rng.normal(size=(16, *shape)).astype(np.float32) for _ in range(2))
    y = rng.integers(0, CLASSES, size=16)

    def one_step(policy):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = compiled(CSKDModel(backbones.get("small_convnet", CLASSES, shape)), lr=0.1)
            before = [w.numpy().copy() for w in model.backbone.trainable_weights]
            fit_one_step(model, x, x_pair, y)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        after = [w.numpy() for w in model.backbone.trainable_weights]
        return model, before, [a - b for a, b in zip(after, before)]

    _, start_32, change_32 = one_step("float32")
    model, start_16, change_16 = one_step("mixed_float16")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.backbone.get_layer("conv1").compute_dtype == "float16"
    for a, b in zip(start_32, start_16):  # Same seed, same float32 variables.
        np.testing.assert_array_equal(a, b)

    def relative(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    flat = lambda arrays: np.concatenate([a.ravel() for a in arrays])  # noqa: E731
    assert np.linalg.norm(flat(change_32)) > 0.05  # The learning rate moves them.
    assert relative(flat(change_16), flat(change_32)) < 0.1
    paths = [w.path for w in model.backbone.trainable_weights]
    for path, a, b in zip(paths, change_16, change_32):  # Each weight, batch-norm's too.
        assert relative(a, b) < 0.25, path


def test_sample_weights_weight_each_anchor_in_every_term():
    """`fit` on `((x, x_pair), y, w)`: one step equals the objective written out with each
    anchor's terms weighted by `w` over the batch size, `mean_i w_i CE_i + lambda mean_i w_i
    KL_i` (Keras' weighting of its own losses), in the logged parts and in the weights.

    Mutant run: the weights dropped from the class-wise term (`values *= ...` removed from
    `term` in `CSKDModel.compute_objective`): `history["cls_loss"][0] == approx(...)` fails
    (the unweighted mean), and so would the weights.
    """
    x, x_pair, y = batch()
    w = np.array([1, 0, 2, 1, 0, 1, 3, 0.5], np.float32)
    model = compiled(CSKDModel(mlp(), temperature=2.0, lambda_cls=3.0))
    reference = mlp()
    with tf.GradientTape() as tape:
        logits = reference(x)
        log_q = tf.nn.log_softmax(tf.stop_gradient(reference(x_pair)) / 2.0)
        kl = 4.0 * tf.reduce_sum(tf.exp(log_q) * (log_q - tf.nn.log_softmax(logits / 2.0)), -1)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        ce_term, kl_term = tf.reduce_mean(w * ce), tf.reduce_mean(w * kl)
        loss = ce_term + 3.0 * kl_term
    grads = tape.gradient(loss, reference.trainable_weights)
    expected = [v.numpy() - 0.1 * g.numpy() for v, g in zip(reference.trainable_weights, grads)]
    ds = tf.data.Dataset.from_tensors(((x, x_pair), y, w))
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False).history
    # Absolute slack: the KL of near-uniform predictions is ~2e-3, its float32 rounding ~1e-7.
    assert history["ce_loss"][0] == pytest.approx(float(ce_term), rel=1e-5)
    assert history["cls_loss"][0] == pytest.approx(float(kl_term), rel=1e-5, abs=1e-6)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert float(kl_term) != pytest.approx(float(tf.reduce_mean(kl)), rel=1e-2)  # w matters.
    for v, e in zip(model.backbone.trainable_weights, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=v.path)
