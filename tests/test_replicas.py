"""Any batch on any number of replicas: short last batches, empty replicas, uneven splits.

Under MirroredStrategy a global batch is split over the replicas; a short last batch can
leave some replicas with fewer examples than others, or none. `cskd_tf.model.Classifier`'s
shared step weights each replica by its share of the global batch and skips the passes of
an empty one, so every method trains through such batches, and without batch-norm (whose
per-replica statistics are the one thing a split changes) any split trains exactly as one
device does on the same global batch.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import backbones
from cskd_tf import callbacks
from cskd_tf import heads
from cskd_tf.byot import BYOTModel
from cskd_tf.ddgsd import DDGSDModel
from cskd_tf.model import Classifier, CSKDModel, HeadModel
from cskd_tf.optim import CoupledWeightDecaySGD

SHAPE, CLASSES = (8, 8, 1), 3


def two_replicas():
    # Reduced through one device: collectives would reuse instance keys of earlier strategies.
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def net(name, seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get(name, CLASSES, SHAPE)


# Every model `--method` builds, with the batches it trains on: "pair" ((x, x'), y),
# "clean" ((x, x', x_clean), y), "plain" (x, y).
METHODS = {
    "ce": (lambda b: Classifier(b), "plain"),
    "cskd": (lambda b: CSKDModel(b, temperature=4.0, lambda_cls=2.0), "pair"),
    "cskd_e": (lambda b: CSKDModel(b, lambda_sample=0.5), "clean"),
    "cskd_sam": (lambda b: CSKDModel(b, lambda_sample=0.5, sample_form="iclr"), "clean"),
    "kd_cskd": (lambda b: CSKDModel(b, teacher=net("mlp", 7), kd_alpha=0.5), "pair"),
    "adacos": (lambda b: HeadModel(b, heads.get("adacos", CLASSES)), "plain"),
    "virtual_softmax": (lambda b: HeadModel(b, heads.get("virtual_softmax", CLASSES)), "plain"),
    "ddgsd": (lambda b: DDGSDModel(b, lambda_mmd=3.0), "pair"),
    "byot": (lambda b: BYOTModel(b), "plain"),
}


def build(method, backbone_name, strategy=None):
    make, kind = METHODS[method]
    with (strategy or tf.distribute.get_strategy()).scope():
        model = make(net(backbone_name))
        model.compile(
            optimizer=CoupledWeightDecaySGD(0.1, momentum=0.9, coupled_weight_decay=1e-3),
            metrics=["accuracy"],
        )
    return model, kind


def dataset(kind, sizes, seed=0):
    """One epoch of batches of the given sizes, for the batch structure `kind`."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x, x_pair, x_clean = (rng.normal(size=(n, *SHAPE)).astype(np.float32) for _ in range(3))
    y = rng.integers(0, CLASSES, size=n)
    inputs = {"plain": x, "pair": (x, x_pair), "clean": (x, x_pair, x_clean)}[kind]
    ends = np.cumsum(sizes)
    batches = [
        tf.nest.map_structure(lambda a, i=i: a[ends[i] - sizes[i] : ends[i]], (inputs, y))
        for i in range(len(sizes))
    ]
    ds = tf.data.Dataset.from_tensors(batches[0])
    for b in batches[1:]:  # Batches of different sizes: concatenate, not batch.
        ds = ds.concatenate(tf.data.Dataset.from_tensors(b))
    return ds


def fit(model, ds):
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


def assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    assert len(a.weights) == len(b.weights)
    for u, v in zip(a.weights, b.weights):
        np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=rtol, atol=atol, err_msg=u.path)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_one_example_batch_trains_on_two_replicas_as_on_one_device(method):
    # The second replica receives nothing: it must contribute zero gradients and leave its
    # batch-norm statistics alone, while the first does exactly one device's step.
    backbone = "small_convnet"  # Batch-norm, and stages for BYOT.
    single, kind = build(method, backbone)
    history_1 = fit(single, dataset(kind, [1]))
    strategy = two_replicas()
    mirrored, _ = build(method, backbone, strategy)
    history_2 = fit(mirrored, dataset(kind, [1]))
    assert_same_weights(single, mirrored)
    for key, value in history_1.items():
        assert history_2[key][0] == pytest.approx(value[0], rel=1e-5, abs=1e-6), key
    bn = mirrored.backbone.get_layer("bn1")
    second = bn.moving_variance.value.values[1].numpy()
    np.testing.assert_array_equal(second, np.ones_like(second))  # The empty replica's copy.
    assert not np.allclose(bn.moving_variance.numpy(), 1.0)  # The first replica's moved.


@pytest.mark.slow
# BYOT needs stages; AdaCos' scale is a median of each replica's batch (their mean, weighted
# by their counts, is stored), which no split of three examples reproduces.
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"byot", "adacos"}))
def test_uneven_and_empty_replica_shares_equal_one_device_without_batch_norm(method):
    # Batches of 4 (2 + 2), 3 (2 + 1) and 1 (1 + 0): each replica's mean is weighted by its
    # share of the global batch, so the steps are one device's (Keras' own 1/replicas
    # weighting would give the single example of the last batch half its weight).
    single, kind = build(method, "mlp")
    history_1 = fit(single, dataset(kind, [4, 3, 1]))
    strategy = two_replicas()
    mirrored, _ = build(method, "mlp", strategy)
    history_2 = fit(mirrored, dataset(kind, [4, 3, 1]))
    assert_same_weights(single, mirrored)
    for key, value in history_1.items():
        assert history_2[key][0] == pytest.approx(value[0], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_cskd_with_batch_norm_trains_an_epoch_whose_last_batch_has_one_example():
    # N = 9, B = 4: batches of 4, 4 and 1 over two replicas (2 + 2, 2 + 2, 1 + 0).
    strategy = two_replicas()
    model, kind = build("cskd", "small_convnet", strategy)
    history = fit(model, dataset(kind, [4, 4, 1]))
    assert np.isfinite(history["loss"][0])
    for weight in model.weights:
        for copy in getattr(weight.value, "values", [weight.value]):
            assert np.all(np.isfinite(copy.numpy())), weight.path
    # The replicas' copies of the moving statistics drift apart in training; a prediction
    # pass first gives every replica the first one's (what saving reads), so it predicts
    # what the saved model predicts, whichever replica holds an example.
    x = np.random.default_rng(5).normal(size=(5, *SHAPE)).astype(np.float32)
    bn = model.backbone.get_layer("bn2").moving_mean.value.values
    assert not np.allclose(bn[0].numpy(), bn[1].numpy())
    out = callbacks.predict(model, tf.data.Dataset.from_tensor_slices((x, np.zeros(5))).batch(5))
    np.testing.assert_array_equal(bn[0].numpy(), bn[1].numpy())
    plain = net("small_convnet")
    plain.set_weights(model.backbone.get_weights())
    np.testing.assert_allclose(out.logits, plain(x, training=False), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_command_on_two_cpu_replicas_with_a_one_example_last_batch(tmp_path):
    # The digits demo's 1438 training images in batches of 479: three full batches and one
    # of a single image, which leaves the second replica empty at the end of every epoch.
    workdir = tmp_path / "run"
    command = [
        sys.executable, "-m", "cskd_tf.train", "--strategy=mirrored", "--cpu_replicas=2",
        "--batch_size=479", "--epochs=2", f"--workdir={workdir}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["train_examples"] % 479 == 1
    assert np.isfinite(metrics["top1_error"]) and metrics["top1_error"] < 0.9
    history = (workdir / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "nan" not in "".join(history).lower()
    assert "--cpu_replicas=2" in (workdir / "flags.txt").read_text()
    assert os.path.isfile(workdir / "checkpoints" / "last.keras")
