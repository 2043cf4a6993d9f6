"""The benchmarks under bench/, run at their smallest: structure and sanity, never timing.

Timed assertions are flaky on shared machines, so nothing here compares a time
with a bound; the benchmarks themselves report whether their targets are met.
"""

import json
import math
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed: import it from the checkout.
    sys.path.insert(0, str(ROOT))

from bench import common
from bench import demo
from bench import eval_metrics
from bench import pipeline
from bench import step_cost
from cskd_tf import backbones
from cskd_tf import metrics
from cskd_tf.backbones.layers import TorchBatchNormalization
from cskd_tf.model import CSKDModel


def assert_summary(summary, count):
    """A `common.summary`: `count` positive finite samples whose median is the one reported."""
    assert len(summary["samples"]) == count
    assert all(math.isfinite(s) and s > 0 for s in summary["samples"])
    assert summary["median"] == pytest.approx(float(np.median(summary["samples"])), rel=1e-9)
    assert summary["min"] == min(summary["samples"])
    assert summary["max"] == max(summary["samples"])


def assert_positive_ratio(value, numerator, denominator):
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(numerator / denominator, rel=1e-4)


def assert_document(document, benchmark, num_rows):
    assert document["benchmark"] == benchmark
    assert len(document["rows"]) == num_rows
    machine = document["machine"]
    assert machine["cpu_model"] and machine["usable_cpus"] >= 1
    assert machine["tensorflow"] == tf.__version__
    assert set(document["code"]) == {"git_commit", "uncommitted"}
    # What the caller holds is what the file holds.
    assert json.loads(common.to_json(document)) == document


# --- common ---------------------------------------------------------------------


def test_interleaved_alternates_the_order_of_each_round():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = common.interleaved(contenders, repeats=3, warmup=1)
    assert calls == list("abc" + "abc" + "cba" + "abc")
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_interleaved_self_timed_keeps_the_durations_it_is_given():
    durations = iter([0.5, 2.0, 0.25, 4.0])
    samples = common.interleaved(
        {"a": lambda: next(durations), "b": lambda: next(durations)},
        repeats=2,
        warmup=0,
        self_timed=True,
    )
    # Round 2 runs b first.
    assert samples == {"a": [0.5, 4.0], "b": [2.0, 0.25]}


def test_summary_and_ratio():
    summary = common.summary([0.003, 0.001, 0.002, 0.004], scale=1e3)
    assert summary == dict(median=2.5, min=1.0, max=4.0, samples=[3.0, 1.0, 2.0, 4.0])
    assert common.summary([1.23456789e-5])["samples"] == [1.23457e-5]
    assert common.ratio(3.0, 2.0) == 1.5
    estimates = common.ratios([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])
    assert estimates == dict(of_medians=1.5, of_minima=2.0, median_of_rounds=2.0)
    with pytest.raises(ValueError):
        common.ratio(1.0, 0.0)


def test_to_json_refuses_what_json_cannot_hold():
    with pytest.raises(ValueError):
        common.to_json({"ratio": float("nan")})


def test_format_table_is_markdown():
    table = common.format_table(["a", "long header"], [[1, "x"], [22, "y"]])
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[1].startswith("|-")


# --- step_cost ------------------------------------------------------------------

TINY = step_cost.Case("small_convnet", (8, 8, 1), batch_size=4, num_classes=3)


@pytest.mark.slow
def test_step_cost_structure_and_profile():
    document = step_cost.run(cases=[TINY], jit_modes=(False,), repeats=2, warmup=0, profile=True)
    assert_document(document, "step_cost", 1)
    row = document["rows"][0]
    assert row["backbone"] == "small_convnet" and row["jit_compile"] is False
    for variant in step_cost.VARIANTS:
        assert_summary(row["step_ms"][variant], 2)
    ce = row["step_ms"]["ce"]["median"]
    assert_positive_ratio(row["ratio_cskd"], row["step_ms"]["cskd"]["median"], ce)
    assert_positive_ratio(row["ratio_concat_2b"], row["step_ms"]["concat_2b"]["median"], ce)
    assert row["ratio_cskd_estimates"]["of_medians"] == row["ratio_cskd"]
    assert_positive_ratio(
        row["ratio_cskd_estimates"]["of_minima"],
        row["step_ms"]["cskd"]["min"],
        row["step_ms"]["ce"]["min"],
    )
    assert row["meets_target"] == (row["ratio_cskd"] <= step_cost.TARGET_RATIO)
    # The two choices of the package, each priced against the CS-KD step.
    assert_positive_ratio(
        row["ratio_torch_bn_over_keras_bn"],
        row["step_ms"]["cskd"]["median"],
        row["step_ms"]["cskd_keras_bn"]["median"],
    )
    assert_positive_ratio(
        row["ratio_float32_over_bfloat16"],
        row["step_ms"]["cskd"]["median"],
        row["step_ms"]["cskd_bf16"]["median"],
    )
    for name in step_cost.RATIOS:
        assert row[f"ratio_{name}_estimates"]["of_medians"] == row[f"ratio_{name}"]
    assert document["settings"]["precision"]["cskd_bf16"] == "mixed_bfloat16"
    assert document["settings"]["precision"]["cskd"] == "float32"

    (profile,) = document["profile"]
    for part in ("ce_step", "cskd_step", "partner_forward", "anchor_forward_backward"):
        assert_summary(profile["part_ms"][part], 2)
    assert_positive_ratio(
        profile["partner_forward_over_ce"],
        profile["part_ms"]["partner_forward"]["median"],
        profile["part_ms"]["ce_step"]["median"],
    )
    table = step_cost.format_tables(document)
    assert "small_convnet @8" in table and "Profile" in table
    assert "torch BN / Keras BN" in table and "float32 / bf16" in table


@pytest.mark.slow
def test_step_cost_reports_only_the_ratios_of_the_variants_timed():
    document = step_cost.run(
        cases=[TINY], jit_modes=(False,), variants=("ce", "cskd_keras_bn"), repeats=1, warmup=0
    )
    (row,) = document["rows"]
    assert set(row["step_ms"]) == {"ce", "cskd_keras_bn"}
    assert not [key for key in row if key.startswith("ratio_")]
    assert "meets_target" not in row
    table = step_cost.format_tables(document)
    assert "cskd_keras_bn ms" in table and "torch BN" not in table
    with pytest.raises(ValueError, match="Unknown variants"):
        step_cost.run(cases=[TINY], variants=("ce", "cskd_fp8"))


@pytest.mark.slow
def test_step_cost_with_xla():
    document = step_cost.run(cases=[TINY], jit_modes=(True,), repeats=1, warmup=0)
    (row,) = document["rows"]
    assert row["jit_compile"] is True
    assert math.isfinite(row["ratio_cskd"]) and row["ratio_cskd"] > 0


def test_concatenated_variant_minimises_the_cskd_objective():
    # Without batch-norm, one pass over concat([x, x_pair]) gives the two passes' logits,
    # so the reference variant's first step must equal CSKDModel's.
    x, x_pair, y = step_cost.random_batch(step_cost.Case("mlp", (4, 4, 1), 8, 3), seed=1)
    logs = {}
    for name, cls in (("cskd", CSKDModel), ("concat_2b", step_cost.Concat2BModel)):
        keras.utils.set_random_seed(0)
        model = cls(backbones.get("mlp", 3, (4, 4, 1)), temperature=2.0)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        logs[name] = model.train_on_batch((x, x_pair), y, return_dict=True)
        logs[name]["weights"] = [w.numpy() for w in model.trainable_weights]
    for key in ("loss", "ce_loss", "cls_loss"):
        assert logs["concat_2b"][key] == pytest.approx(logs["cskd"][key], rel=1e-5)
    for a, b in zip(logs["cskd"]["weights"], logs["concat_2b"]["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def batch_norm_pairs(torch_model, keras_model):
    """The batch-norm layers of a model and of its `with_keras_batch_norm` copy, by name."""
    torch_bns = [l for l in torch_model.layers if isinstance(l, TorchBatchNormalization)]
    keras_bns = {l.name: l for l in keras_model.layers}
    return [(l, keras_bns[l.name]) for l in torch_bns]


def assert_unbiased_over_biased(torch_bn, keras_bn, passes, batch_size):
    """The moving statistics after `passes` training passes of `batch_size`, from variance 1.

    With momentum m, each pass keeps m of the moving variance and adds (1 - m) of the
    batch's: after k passes it is m**k + (1 - m) * sum(m**(k-1-i) * variance_i), the
    variances unbiased (times n / (n - 1), n = batch x height x width values per channel)
    in TorchBatchNormalization and biased in Keras' layer. The moving means agree.
    """
    _, height, width, _ = torch_bn.output.shape
    n = batch_size * height * width
    carried = torch_bn.momentum**passes
    torch_added = torch_bn.moving_variance.numpy() - carried
    keras_added = keras_bn.moving_variance.numpy() - carried
    np.testing.assert_allclose(torch_added, keras_added * n / (n - 1), rtol=1e-4)
    assert np.all(np.abs(torch_added - keras_added) > 0)  # The one difference is real.
    np.testing.assert_allclose(torch_bn.moving_mean, keras_bn.moving_mean, atol=1e-6)


def test_keras_batch_norm_copy_differs_only_in_the_moving_variance():
    keras.utils.set_random_seed(0)
    net = backbones.get(TINY.backbone, TINY.num_classes, TINY.input_shape)
    rng = np.random.default_rng(0)
    for layer in net.layers:  # Non-trivial statistics and scales, so inference depends on them.
        if isinstance(layer, TorchBatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 2.0, gamma.shape),
                    rng.normal(size=beta.shape),
                    rng.normal(size=mean.shape),
                    np.ones_like(variance),  # Moving variance 1, as initialised.
                ]
            )
    copy = step_cost.with_keras_batch_norm(net)
    pairs = batch_norm_pairs(net, copy)
    assert len(pairs) == 3
    for torch_bn, keras_bn in pairs:
        assert type(keras_bn) is keras.layers.BatchNormalization
        assert keras_bn.get_config() == torch_bn.get_config()
    assert not any(isinstance(l, TorchBatchNormalization) for l in copy.layers)
    assert [v.path for v in copy.weights] == [v.path for v in net.weights]
    for a, b in zip(net.weights, copy.weights):
        assert a is not b
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    x, _, _ = step_cost.random_batch(TINY, seed=2)
    np.testing.assert_allclose(copy(x, training=False), net(x, training=False), atol=1e-6)
    np.testing.assert_allclose(copy(x, training=True), net(x, training=True), atol=1e-6)
    for torch_bn, keras_bn in pairs:
        assert_unbiased_over_biased(torch_bn, keras_bn, passes=1, batch_size=TINY.batch_size)


@pytest.mark.slow
def test_keras_batch_norm_contender_takes_the_same_cskd_step():
    # The bench's own two contenders: the same start, loss, gradients and update.
    x, x_pair, y = step_cost.random_batch(TINY, seed=1)
    models = {
        v: step_cost.build_model(v, TINY, jit_compile=False) for v in ("cskd", "cskd_keras_bn")
    }
    for a, b in zip(models["cskd"].weights, models["cskd_keras_bn"].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    logs = {v: m.train_on_batch((x, x_pair), y, return_dict=True) for v, m in models.items()}
    for key in ("loss", "ce_loss", "cls_loss", "accuracy"):
        assert logs["cskd_keras_bn"][key] == pytest.approx(logs["cskd"][key], rel=1e-5)
    torch_model, keras_model = models["cskd"], models["cskd_keras_bn"]
    for a, b in zip(torch_model.trainable_weights, keras_model.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    # Two training-mode passes per CS-KD step (anchors, then partners) update the statistics.
    for torch_bn, keras_bn in batch_norm_pairs(torch_model.backbone, keras_model.backbone):
        assert_unbiased_over_biased(torch_bn, keras_bn, passes=2, batch_size=TINY.batch_size)


def test_bfloat16_contender_is_built_as_the_trainer_builds_it():
    bf16 = step_cost.build_model("cskd_bf16", TINY, jit_compile=False)
    assert keras.config.dtype_policy().name == "float32"  # The trainer's scope restored it.
    fp32 = step_cost.build_model("cskd", TINY, jit_compile=False)
    for name in ("conv1", "bn1", "relu3"):
        layer = bf16.backbone.get_layer(name)
        assert (layer.compute_dtype, layer.variable_dtype) == ("bfloat16", "float32")
        assert fp32.backbone.get_layer(name).compute_dtype == "float32"
    assert bf16.backbone.get_layer("logits").compute_dtype == "float32"
    # The same function at bfloat16's precision (8 significant bits): same weights, close logits.
    bf16.set_weights(fp32.get_weights())
    x, x_pair, y = step_cost.random_batch(TINY, seed=3)
    logits = bf16(x, training=False)
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(logits, fp32(x, training=False), atol=0.05)
    logs = bf16.train_on_batch((x, x_pair), y, return_dict=True)
    assert all(math.isfinite(logs[k]) for k in ("loss", "ce_loss", "cls_loss"))


# --- pipeline -------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_structure():
    settings = pipeline.Settings(
        num_pixel_images=64,
        num_jpegs=8,
        jpeg_size=(48, 64),
        num_classes=4,
        batch_size_32=4,
        batch_size_224=2,
        num_batches_32=3,
        num_batches_224=2,
        warmup_batches=1,
        backbone_32="small_convnet",
        backbone_224="small_convnet",
    )
    document = pipeline.run(settings=settings, repeats=2)
    assert_document(document, "pipeline", 3)
    for row, case in zip(document["rows"], pipeline.CASES):
        assert row["case"] == case
        size = 32 if case == "pixels" else 224
        assert row["input_shape"] == [size, size, 3]
        assert_summary(row["pipeline_anchors_per_s"], 2)
        assert_summary(row["model_anchors_per_s"], 2)
        assert_positive_ratio(
            row["ratio"],
            row["pipeline_anchors_per_s"]["median"],
            row["model_anchors_per_s"]["median"],
        )
        assert row["meets_target"] == (row["ratio"] >= pipeline.TARGET_RATIO)
    assert document["rows"][1]["mean_jpeg_bytes"] > 0
    assert "encoded (imagenet)" in pipeline.format_table(document)


def test_random_jpegs_decode_near_the_asked_size():
    for jpeg in pipeline.random_jpegs(4, size=(100, 200), seed=3):
        height, width, channels = tf.io.decode_jpeg(jpeg).shape
        assert 90 <= height <= 110 and 180 <= width <= 220 and channels == 3


# --- eval_metrics ---------------------------------------------------------------


def test_eval_metrics_structure_and_values():
    document = eval_metrics.run(sizes=(300,), dim=16, num_classes=5, repeats=3, rss=True)
    assert_document(document, "eval_metrics", 1)
    (row,) = document["rows"]
    for name in eval_metrics.METRICS:
        assert_summary(row["seconds"][name], 3)
        assert row["rss_peak_delta_bytes"][name] >= 0
    assert_summary(row["total_seconds"], 3)
    # The R@1 distance chunk alone is 300 x 300 float32.
    assert row["tracemalloc_peak_bytes"]["recall_at_1"] >= 300 * 300 * 4
    features, probs, labels = eval_metrics.make_inputs(300, 16, 5, seed=0)
    assert row["values"]["ece"] == pytest.approx(
        metrics.expected_calibration_error(probs, labels), abs=1e-6
    )
    assert row["values"]["recall_at_1"] == pytest.approx(
        metrics.recall_at_k(features, labels), abs=1e-6
    )
    assert row["meets_memory_target"] is True
    assert "300 x 16" in eval_metrics.format_table(document)


def test_make_inputs_gives_distributions():
    features, probs, labels = eval_metrics.make_inputs(50, dim=8, num_classes=7)
    assert features.shape == (50, 8) and features.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    assert labels.min() >= 0 and labels.max() < 7


def test_traced_peak_bytes_counts_a_numpy_buffer():
    assert eval_metrics.traced_peak_bytes(lambda: np.ones(2**20)) >= 8 * 2**20


def test_eval_metrics_script_runs_from_the_root_and_writes_json(tmp_path):
    path = tmp_path / "out" / "eval.json"
    args = ["bench/eval_metrics.py", "--sizes=200", "--dim=8", "--repeats=1", "--no_rss"]
    completed = subprocess.run(
        [sys.executable, *args, f"--json={path}"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| 200 x 8" in completed.stdout
    document = json.loads(path.read_text())
    assert document["benchmark"] == "eval_metrics" and document["settings"]["sizes"] == [200]


# --- demo -----------------------------------------------------------------------

STAND_IN = """
import argparse, json, os
parser = argparse.ArgumentParser()
for name in ("method", "epochs", "workdir"):
    parser.add_argument("--" + name)
args = parser.parse_args()
os.makedirs(args.workdir)
metrics = dict(train_seconds=2.0 if args.method == "cskd" else 0.5, top1_error=0.1, ece=0.05)
with open(os.path.join(args.workdir, "metrics.json"), "w") as f:
    json.dump(metrics, f)
"""


def test_demo_reads_each_runs_metrics(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    document = demo.run(epochs=1, repeats=3, command=(sys.executable, str(script)))
    assert_document(document, "demo", 2)
    rows = {r["method"]: r for r in document["rows"]}
    assert rows["cskd"]["train_seconds"]["samples"] == [2.0, 2.0, 2.0]
    assert document["ratio_train_seconds"] == 4.0
    for row in rows.values():
        assert_summary(row["wall_seconds"], 3)
    assert_positive_ratio(
        document["ratio_wall_seconds"],
        rows["cskd"]["wall_seconds"]["median"],
        rows["ce"]["wall_seconds"]["median"],
    )
    assert "cskd / ce" in demo.format_table(document)


@pytest.mark.slow
def test_demo_end_to_end_one_epoch():
    document = demo.run(epochs=1, repeats=1)
    rows = {r["method"]: r for r in document["rows"]}
    for row in rows.values():
        assert_summary(row["train_seconds"], 1)
        assert 0 <= row["top1_error"][0] <= 1
    assert math.isfinite(document["ratio_train_seconds"]) and document["ratio_train_seconds"] > 0
