"""BYOT: the stages it finds, its loss written out in numpy, its gradients, replicas, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from cskd_tf import backbones, callbacks
from cskd_tf.byot import BYOTModel, stage_layers, stage_outputs

SHAPE, CLASSES = (8, 8, 1), 3
PARTS = ("ce_loss", "aux_ce_loss", "aux_kd_loss", "aux_feature_loss")


def convnet(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get("small_convnet", CLASSES, SHAPE)


def byot(seed=0, **kwargs):
    model = BYOTModel(convnet(seed), **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    return model


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    return x, rng.integers(0, CLASSES, size=n)


def one_step(model, x, y):
    ds = tf.data.Dataset.from_tensors((x, y))
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


# Independent numpy versions of the terms (float64), each a mean over the batch.


def np_ce(logits, y):
    log_p = special.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return -log_p[np.arange(len(y)), y].mean()


def np_kd(student, teacher, t):
    log_p = special.log_softmax(np.asarray(student, np.float64) / t, axis=-1)
    log_q = special.log_softmax(np.asarray(teacher, np.float64) / t, axis=-1)
    return t**2 * (np.exp(log_q) * (log_q - log_p)).sum(-1).mean()


def np_feature(student, teacher):
    diff = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
    return (diff**2).sum(-1).mean()


def np_terms(outputs, y, t, alpha, beta):
    logits, features, *aux = [np.asarray(o) for o in outputs]
    aux_logits, aux_features = aux[: len(aux) // 2], aux[len(aux) // 2 :]
    parts = {
        "ce_loss": np_ce(logits, y),
        "aux_ce_loss": sum(np_ce(q, y) for q in aux_logits),
        "aux_kd_loss": sum(np_kd(q, logits, t) for q in aux_logits),
        "aux_feature_loss": sum(np_feature(f, features) for f in aux_features),
    }
    parts["loss"] = (
        parts["ce_loss"]
        + (1 - alpha) * parts["aux_ce_loss"]
        + alpha * parts["aux_kd_loss"]
        + beta * parts["aux_feature_loss"]
    )
    return parts


# --- Stages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape,expected,sizes",
    [
        # 32x32 through resnet's 7x7/2 stem and max-pool: stage 1 is 8x8.
        ("resnet18", (32, 32, 3), ["layer1_1_out", "layer2_1_out", "layer3_1_out"], [8, 4, 2]),
        (
            "preact_resnet18",
            (32, 32, 3),
            ["layer1_1_add", "layer2_1_add", "layer3_1_add"],
            [32, 16, 8],
        ),
        ("small_convnet", SHAPE, ["relu1", "relu2"], [8, 4]),
        pytest.param(
            "densenet121",
            (32, 32, 3),
            [
                "denseblock1_layer6_concat",
                "denseblock2_layer12_concat",
                "denseblock3_layer24_concat",
            ],
            [32, 16, 8],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_stage_outputs_end_each_stage_but_the_last(name, shape, expected, sizes):
    net = backbones.get(name, CLASSES, shape)
    assert stage_layers(net) == expected
    outputs = stage_outputs(net)
    assert [o.shape[1] for o in outputs] == sizes
    for output, layer in zip(outputs, expected):
        assert output is net.get_layer(layer).output


def test_auxiliary_heads_bring_every_stage_to_the_deepest_feature_width():
    model = BYOTModel(backbones.get("resnet18", CLASSES, (32, 32, 3)))
    shapes = [tuple(o.shape) for o in model.training_model.outputs]
    assert shapes == [(None, CLASSES), (None, 512)] + [(None, CLASSES)] * 3 + [(None, 512)] * 3
    # BYOT's bottleneck: kernel = stride = the downsampling to the last stage (8, 4, 2).
    layer = model.training_model.get_layer
    assert [layer(f"aux{i}_conv2").strides for i in (1, 2, 3)] == [(8, 8), (4, 4), (2, 2)]
    assert layer("aux1_conv3").filters == 512 and layer("aux1_conv1").filters == 128


def test_a_backbone_without_stages_raises_one_sentence():
    with pytest.raises(ValueError, match="Backbone 'mlp' has no stages that BYOT recognises"):
        stage_outputs(backbones.get("mlp", CLASSES, SHAPE))
    with pytest.raises(ValueError, match="has no stages"):
        BYOTModel(backbones.get("mlp", CLASSES, SHAPE))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"beta": -1.0}, "beta must be >= 0"),
    ],
)
def test_bad_weights_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BYOTModel(convnet(), **kwargs)


# --- The loss ---------------------------------------------------------------------


def test_with_alpha_and_beta_zero_each_head_learns_from_the_labels_alone():
    x, y = batch()
    model = byot(alpha=0.0, beta=0.0)
    terms, out = model.compute_terms(x, y)
    assert model.num_auxiliary == len(out["aux_logits"]) == 2
    expected = np_ce(out["logits"], y) + sum(np_ce(q, y) for q in out["aux_logits"])
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["aux_ce_loss"]) == pytest.approx(expected - np_ce(out["logits"], y))
    # The other terms are still reported, just not added.
    assert float(terms["aux_kd_loss"]) > 0 and float(terms["aux_feature_loss"]) > 0


@pytest.mark.slow
def test_a_step_reports_the_loss_recomputed_from_the_outputs():
    x, y = batch()
    kwargs = {"temperature": 2.0, "alpha": 0.4, "beta": 0.1}
    model = byot(**kwargs)
    # Training mode normalises with the batch's statistics: the step sees these outputs.
    outputs = model.training_model(x, training=True)
    expected = np_terms(outputs, y, 2.0, 0.4, 0.1)
    terms, _ = model.compute_terms(x, y)
    history = one_step(model, x, y)
    assert set(history) == {"loss", "accuracy", *PARTS}
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
        assert history[name][0] == pytest.approx(value, rel=1e-5), name
    # Accuracy comes from the deepest classifier.
    accuracy = np.mean(np.argmax(np.asarray(outputs[0]), -1) == y)
    assert history["accuracy"][0] == pytest.approx(accuracy)


def test_sample_weights_weight_every_term():
    x, y = batch()
    model = byot(alpha=0.5, beta=0.2)
    weights = np.array([1, 0, 2, 1, 0, 1, 3, 1], np.float32)
    terms, out = model.compute_terms(x, y, weights)
    repeated = np.repeat(np.arange(len(y)), weights.astype(int))
    # Weight w is the example counted w times, over the same denominator (the batch size).
    scale = len(repeated) / len(y)
    outputs = [out["logits"], out["features"], *out["aux_logits"], *out["aux_features"]]
    expected = np_terms([np.asarray(o)[repeated] for o in outputs], y[repeated], 3.0, 0.5, 0.2)
    for name in PARTS:
        assert float(terms[name]) == pytest.approx(scale * expected[name], rel=1e-5), name


def test_kd_and_feature_terms_do_not_train_the_deepest_classifier():
    x, y = batch()
    model = byot()
    net = model.backbone
    deepest = [
        *net.get_layer("logits").trainable_weights,
        *net.get_layer("conv3").trainable_weights,
    ]
    shallow = [
        *net.get_layer("conv1").trainable_weights,
        model.training_model.get_layer("aux1_logits").kernel,
    ]
    # The variables' tensors: unconnected gradients of Keras variables cannot be zero-filled.
    deepest, shallow = [w.value for w in deepest], [w.value for w in shallow]
    with tf.GradientTape(persistent=True) as tape:
        terms, _ = model.compute_terms(x, y)
        distillation = terms["aux_kd_loss"] + terms["aux_feature_loss"]
    zero = tf.UnconnectedGradients.ZERO
    for grad in tape.gradient(distillation, deepest, unconnected_gradients=zero):
        np.testing.assert_array_equal(grad.numpy(), 0.0)
    # They do train the shallow layers and the heads, and the full loss trains the deepest.
    for grad in tape.gradient(distillation, shallow, unconnected_gradients=zero):
        assert np.abs(grad.numpy()).max() > 0
    for grad in tape.gradient(terms["loss"], deepest, unconnected_gradients=zero):
        assert np.abs(grad.numpy()).max() > 0


def written_out_loss(outputs, y, t, alpha, beta):
    """BYOT's objective from the training model's outputs, in TensorFlow, without cskd_tf.losses:
    `CE(q_C) + sum_i (1 - a) CE(q_i) + a T^2 KL(sg(p_C^T) || p_i^T) + b ||F_i - sg(F_C)||^2`."""
    logits, features, *aux = outputs
    aux_logits, aux_features = aux[: len(aux) // 2], aux[len(aux) // 2 :]
    rows = tf.stack([tf.range(len(y)), tf.constant(y, tf.int32)], 1)

    def ce(q):
        return -tf.reduce_mean(tf.gather_nd(tf.nn.log_softmax(q), rows))

    log_teacher = tf.nn.log_softmax(tf.stop_gradient(logits) / t)
    loss = ce(logits)
    for q, f in zip(aux_logits, aux_features):
        kl = tf.reduce_sum(tf.exp(log_teacher) * (log_teacher - tf.nn.log_softmax(q / t)), -1)
        squared = tf.reduce_sum(tf.square(f - tf.stop_gradient(features)), -1)
        loss += (
            (1 - alpha) * ce(q)
            + alpha * t**2 * tf.reduce_mean(kl)
            + beta * tf.reduce_mean(squared)
        )
    return loss


def test_one_step_updates_every_weight_as_the_objective_written_out():
    """One SGD step lands every weight (the auxiliary heads' too) on `w - lr * grad` of the
    objective written out, and the batch-norm statistics on those of one training pass.

    Mutant run: `Classifier.train_step` differentiating and updating
    `self.backbone.trainable_weights` instead of `self.trainable_weights` (the auxiliary heads
    never train; every test of test_model.py, test_ddgsd.py and test_heads.py and every other
    fast test of this module passes with it): `assert_allclose(a.numpy(), b.numpy(), ...)`
    fails at `aux1_conv1/kernel`, the first auxiliary weight.
    """
    x, y = batch()
    kwargs = {"temperature": 2.0, "alpha": 0.4, "beta": 0.1}
    model, reference = byot(**kwargs), byot(**kwargs)
    start = {w.path: w.numpy().copy() for w in model.weights}
    for b in reference.weights:  # Same seed: the same initial weights.
        np.testing.assert_array_equal(start[b.path], b.numpy(), err_msg=b.path)
    with tf.GradientTape() as tape:
        outputs = reference.training_model(x, training=True)  # Updates its BN statistics once.
        loss = written_out_loss(outputs, y, **{"t": 2.0, "alpha": 0.4, "beta": 0.1})
    trainable = reference.trainable_weights
    assert any(w.path.startswith("aux") for w in trainable)
    for w, g in zip(trainable, tape.gradient(loss, trainable)):
        w.assign(w - 0.1 * g)
    history = one_step(model, x, y)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert [w.path for w in model.weights] == [w.path for w in reference.weights]
    for a, b in zip(model.weights, reference.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)
    for w in model.trainable_weights:  # The learning rate moves every one of them.
        assert not np.allclose(w.numpy(), start[w.path]), w.path


# --- A plain classifier outside training ----------------------------------------------


@pytest.mark.slow
def test_call_predict_and_evaluate_are_the_backbones():
    x, y = batch()
    model = byot()
    one_step(model, x, y)
    expected = model.backbone(x).numpy()
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert callbacks.classifier_of(model) is model.backbone
    assert len(model.backbone.outputs) == 1
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"}
    assert logs["loss"] == pytest.approx(np_ce(expected, y), rel=1e-5)


@pytest.mark.slow
def test_two_replicas_equal_one_device():
    # Each replica's half of the batch is the same four examples, so both replicas normalise
    # with the statistics of the whole batch and the split changes nothing but the reduction.
    x, y = batch(n=4)
    x, y = np.concatenate([x, x]), np.concatenate([y, y])
    single = byot(alpha=0.4, beta=0.1)
    history_1 = one_step(single, x, y)
    # Reduced through one device, not collectives: collective instance keys restart with every
    # strategy of a process, and this test's would clash with those of later tests' strategies.
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    with strategy.scope():
        mirrored = byot(alpha=0.4, beta=0.1)
    history_2 = one_step(mirrored, x, y)
    assert len(single.weights) == len(mirrored.weights)
    # Batch-norm updates the moving variance with the unbiased batch variance, as PyTorch,
    # over n = batch x height x width values: each replica's n is half the single device's,
    # so from the same biased variance the update's second term differs by the known ratio
    # (n_r / (n_r - 1)) / (n / (n - 1)). Everything else is equal.
    counts = {
        layer.moving_variance.path: int(np.prod(layer.input.shape[1:-1]))
        for layer in single.training_model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert len(counts) > 3
    for a, b in zip(single.weights, mirrored.weights):
        if a.path in counts:
            n, n_r = 8 * counts[a.path], 4 * counts[a.path]
            ratio = (n_r / (n_r - 1)) / (n / (n - 1))
            np.testing.assert_allclose(
                b.numpy() - 0.9, (a.numpy() - 0.9) * ratio, rtol=1e-4, err_msg=a.path
            )
            continue
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=a.path)
    for key in ("loss", *PARTS):
        assert history_2[key][0] == pytest.approx(history_1[key][0], rel=1e-5, abs=2e-6), key


@pytest.mark.slow
def test_save_and_load_keep_the_auxiliary_heads_and_resume_training(tmp_path):
    x, y = batch()
    model = BYOTModel(convnet(), temperature=2.0, alpha=0.2, beta=0.05)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    one_step(model, x, y)
    model.save(tmp_path / "byot.keras")
    loaded = keras.models.load_model(tmp_path / "byot.keras")
    assert isinstance(loaded, BYOTModel)
    assert (loaded.temperature, loaded.alpha, loaded.beta) == (2.0, 0.2, 0.05)
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    assert any("aux" in w.path for w in loaded.weights)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(model.training_model(x), loaded.training_model(x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    # The momentum is restored too: one more step of each lands on the same weights.
    one_step(model, x, y)
    one_step(loaded, x, y)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
