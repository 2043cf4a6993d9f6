import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import backbones
from cskd_tf import callbacks
from cskd_tf import metrics
from cskd_tf.model import CSKDModel

SHAPE = (4, 4, 1)
CLASSES = 3


def two_replicas():
    """Two replicas on the two logical CPUs, reduced through one device: collectives would
    reuse instance keys that earlier tests' strategies used in this process, and abort."""
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def arrays(n=13, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=n).astype(np.int64)
    return x, y


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get("mlp", CLASSES, SHAPE)


def examples(x, y, batch_size=5):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def pairs(x, y, batch_size=4):
    # Any same-class partner will do here: the rolled index within each class.
    partner = np.empty(len(y), np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        partner[members] = np.roll(members, 1)
    return tf.data.Dataset.from_tensor_slices(((x, x[partner]), y)).batch(batch_size)


def test_predictor_returns_the_logits_features_and_labels_in_order():
    x, y = arrays()
    net = mlp()
    out = callbacks.predict(net, examples(x, y))
    np.testing.assert_allclose(out.logits, net.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    features = keras.Model(net.input, net.get_layer(backbones.FEATURES_LAYER).output)
    np.testing.assert_allclose(out.features, features(x).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.labels, y)


def test_predictor_of_a_cskd_model_uses_its_backbone():
    x, y = arrays()
    model = CSKDModel(mlp())
    out = callbacks.predict(model, examples(x, y))
    np.testing.assert_allclose(out.logits, model.backbone(x).numpy(), rtol=1e-5, atol=1e-6)


def test_two_replicas_give_the_arrays_of_one_device():
    x, y = arrays(n=13)  # Batches of 5: the last one (3) splits unevenly over two replicas.
    single = callbacks.predict(mlp(), examples(x, y))
    strategy = two_replicas()
    with strategy.scope():
        net = mlp()
    assert net.distribute_strategy.num_replicas_in_sync == 2
    both = callbacks.predict(net, examples(x, y))
    np.testing.assert_allclose(both.logits, single.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.features, single.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both.labels, y)


def test_a_model_without_a_features_layer_gives_its_penultimate_activations():
    x, y = arrays()
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(6), keras.layers.Dense(3)]
    )
    out = callbacks.predict(net, examples(x, y))
    penultimate = keras.Sequential(net.layers[:2])
    np.testing.assert_allclose(out.features, penultimate(x).numpy(), rtol=1e-5, atol=1e-6)
    assert out.features.shape == (13, 6)


def test_callback_scores_the_evaluated_epochs_for_every_later_callback(tmp_path):
    x, y = arrays(n=24)
    val_x, val_y = arrays(n=11, seed=1)
    model = CSKDModel(mlp())
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    evaluation = callbacks.EvaluationCallback(examples(val_x, val_y), every=3)
    checkpoint = tmp_path / "best.keras"
    history = model.fit(
        pairs(x, y),
        epochs=4,
        verbose=0,
        callbacks=[
            evaluation,
            keras.callbacks.CSVLogger(str(tmp_path / "history.csv")),
            keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor="val_ece", mode="min", save_best_only=True
            ),
        ],
    ).history
    # Epochs 1 (always), 3 (every third) and 4 (the last) are scored; epoch 2 is not.
    assert [evaluation.due(e) for e in range(4)] == [True, False, True, True]
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["val_ece"] != "NA" for r in rows] == [True, False, True, True]
    for key in ("top1_error", "top5_error", "nll", "ece", "aurc", "recall_at_1"):
        assert len(history[f"val_{key}"]) == 3
    # The last scores are those of the final model, computed independently.
    logits = model.predict(val_x, verbose=0)
    features = keras.Model(
        model.backbone.input, model.backbone.get_layer(backbones.FEATURES_LAYER).output
    )(val_x).numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert history["val_ece"][-1] == pytest.approx(
        metrics.expected_calibration_error(probs, val_y, 20), abs=1e-6
    )
    assert history["val_recall_at_1"][-1] == pytest.approx(
        metrics.recall_at_k(features, val_y, 1), abs=1e-9
    )
    assert history["val_top1_error"][-1] == pytest.approx(
        np.mean(logits.argmax(1) != val_y), abs=1e-9
    )
    assert checkpoint.exists()  # ModelCheckpoint saw val_ece.


@pytest.mark.slow
def test_callback_under_two_replicas_matches_one_device():
    x, y = arrays(n=24)
    val_x, val_y = arrays(n=11, seed=1)

    def fit(strategy):
        with strategy.scope():
            model = CSKDModel(mlp())
            model.compile(optimizer=keras.optimizers.SGD(0.05))
        evaluation = callbacks.EvaluationCallback(examples(val_x, val_y))
        return model.fit(pairs(x, y), epochs=2, verbose=0, callbacks=[evaluation]).history

    one = fit(tf.distribute.get_strategy())
    two = fit(two_replicas())
    for key in ("val_top1_error", "val_nll", "val_ece", "val_recall_at_1"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5)


def test_callback_rejects_a_bad_frequency():
    with pytest.raises(ValueError, match="every must be >= 1"):
        callbacks.EvaluationCallback(None, every=0)


def test_classification_metrics_add_recall_at_1_with_features():
    x, y = arrays(n=30)
    features = x.reshape(30, -1)
    logits = np.random.default_rng(2).normal(size=(30, CLASSES))
    results = metrics.classification_metrics(logits, y, features=features)
    # Brute force: the nearest other example's label.
    distances = ((features[:, None] - features[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    assert results["recall_at_1"] == pytest.approx(np.mean(y[distances.argmin(1)] == y))
    assert "recall_at_1" not in metrics.classification_metrics(logits, y)
