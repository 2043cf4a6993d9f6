import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from cskd_tf import backbones
from cskd_tf import methods
from cskd_tf import train
from cskd_tf.data import sources
from cskd_tf.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.flags"))


def parse_flagfile(path, extra=()):
    values = flags.FlagValues()
    holders = train.define_flags(values)
    cwd = os.getcwd()
    os.chdir(ROOT)  # Flagfiles include configs/base.flags relative to the root.
    try:
        values(["train", f"--flagfile={path}", *extra])
    finally:
        os.chdir(cwd)
    return {name: h.value for name, h in holders.items()}


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "cskd_tf.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_names_known_things(config):
    values = parse_flagfile(config)
    assert values["dataset"] in sources.names()
    backbone = values["backbone"] or train.DEFAULTS[values["dataset"]]["backbone"]
    assert backbone in backbones.names()
    assert values["method"] in methods.names()
    assert values["temperature"] > 0 and values["lambda_cls"] >= 0
    header = config.read_text().splitlines()[0]
    assert header.startswith("# ") and len(header) > 20


def test_paper_configs_carry_the_paper_settings():
    cub = parse_flagfile(ROOT / "configs/cub.flags")
    assert (cub["dataset"], cub["backbone"], cub["batch_size"], cub["epochs"]) == (
        "cub",
        "resnet18",
        32,
        200,
    )
    assert (cub["method"], cub["temperature"], cub["lambda_cls"]) == ("cskd", 4.0, 3.0)
    assert (cub["lr"], cub["momentum"], cub["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert parse_flagfile(ROOT / "configs/cub_ce.flags")["method"] == "ce"
    cifar = parse_flagfile(ROOT / "configs/cifar100.flags")
    assert (cifar["backbone"], cifar["batch_size"]) == ("preact_resnet18", 128)


def test_run_writes_metrics_flags_and_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    result = train.run(
        dataset="digits",
        backbone="mlp",
        epochs=2,
        batch_size=64,
        val_split=0.1,
        workdir=str(workdir),
        verbose=0,
    )
    metrics = json.loads((workdir / "metrics.json").read_text())
    for key in ("top1_error", "top5_error", "nll", "ece", "aurc", "val_top1_error", "val_ece"):
        assert 0 <= metrics[key] <= (10 if key == "nll" else 1)
    assert metrics["top5_error"] <= metrics["top1_error"]
    assert metrics["num_examples"] == 359
    # metrics.json agrees with an evaluation of the returned model.
    src = sources.load_digits()
    from cskd_tf import data  # pylint: disable=g-import-not-at-top

    aug = data.Augmenter("digits")
    ds = data.example_dataset(src.test.values, src.test.labels, 128, augment=aug.eval)
    logs = result["model"].evaluate(ds, verbose=0, return_dict=True)
    assert metrics["top1_error"] == pytest.approx(1 - logs["accuracy"], abs=1e-6)
    assert metrics["nll"] == pytest.approx(logs["loss"], rel=1e-4)
    history = result["history"]
    assert set(history) >= {"loss", "ce_loss", "cls_loss", "accuracy", "val_ece", "val_recall_at_1"}
    # Both epochs are scored, and the last scores are those of the final model.
    for key in ("top1_error", "ece", "recall_at_1", "aurc", "nll"):
        assert len(history[f"val_{key}"]) == 2
        assert history[f"val_{key}"][-1] == pytest.approx(metrics[f"val_{key}"], abs=1e-6)
    assert 0 <= metrics["recall_at_1"] <= 1
    assert (workdir / "checkpoints/last.keras").exists()
    assert (workdir / "checkpoints/best.keras").exists()
    assert any((workdir / "tensorboard").rglob("events.out.tfevents*"))
    # flags.txt reruns the same experiment: the training flags and those CS-KD reads.
    rerun = train.read_flagfile(workdir / "flags.txt")
    assert rerun == dict(
        dataset="digits",
        data_dir=None,
        backbone="mlp",
        method="cskd",
        temperature=4.0,
        lambda_cls=1.0,
        label_smoothing=0.0,
        entropy_weight=0.0,
        epochs=2,
        batch_size=64,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        val_split=0.1,
        eval_every=1,
        jit_compile=None,
        mixed_precision="none",
        strategy="auto",
        cpu_replicas=0,
        seed=0,
        deterministic=False,
        save_every_steps=500,
        run_eagerly=False,
        workdir=str(workdir),
    )


def test_cross_entropy_method_trains_the_plain_backbone(tmp_path):
    result = train.run(
        dataset="digits",
        backbone="mlp",
        method="ce",
        epochs=1,
        batch_size=64,
        workdir=str(tmp_path / "ce"),
        verbose=0,
    )
    assert "cls_loss" not in result["history"]
    assert 0 <= result["metrics"]["top1_error"] <= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dataset="nope"), "Unknown data set 'nope'"),
        (dict(backbone="nope"), "Unknown backbone 'nope'"),
        (dict(method="nope"), "Unknown method 'nope'"),
        (dict(temperature=0.0), "--temperature must be > 0"),
        (dict(lambda_cls=-1.0), "--lambda_cls must be >= 0"),
        (dict(val_split=1.0), "--val_split must be in [0, 1)"),
        (dict(eval_every=-1), "--eval_every must be >= 0"),
        (dict(batch_size=10_000), "larger than the 1438 training examples"),
    ],
)
def test_user_mistakes_raise_one_sentence_and_leave_no_folder(tmp_path, kwargs, message):
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train.run(workdir=str(workdir), **kwargs)
    assert message in str(err.value)
    assert not workdir.exists()


def test_a_folder_that_is_not_a_run_folder_is_not_touched(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="is not empty and is not a run folder"):
        train.run(workdir=str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert (tmp_path / "metrics.json").read_text() == "{}"


def write_tree(root, counts, size=(40, 48)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, n in counts.items():
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())


@pytest.mark.slow
def test_image_folder_tree_trains(tmp_path):
    write_tree(tmp_path / "data", {"ant": 3, "bee": 2, "cat": 1})
    result = train.run(
        dataset="tiny_imagenet",
        data_dir=str(tmp_path / "data"),
        backbone="mlp",
        epochs=1,
        batch_size=4,
        workdir=str(tmp_path / "run"),
        verbose=0,
    )
    assert len(result["history"]["loss"]) == 1
    assert np.isfinite(result["history"]["cls_loss"][0])
    assert result["metrics"]["num_examples"] == 6


@pytest.mark.slow
def test_cifar100_through_tfds_mock_trains_one_epoch(tmp_path):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    with tfds.testing.mock_data(num_examples=16):
        result = train.run(
            dataset="cifar100",
            backbone="mlp",
            epochs=1,
            batch_size=8,
            workdir=str(tmp_path / "run"),
            verbose=0,
        )
    assert len(result["history"]["loss"]) == 1
    assert result["metrics"]["num_examples"] == 16


@pytest.mark.slow
def test_cli_smoke_config_runs_headless_one_line_per_epoch(tmp_path):
    workdir = tmp_path / "smoke"
    proc = run_cli("--flagfile=configs/smoke.flags", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((workdir / "metrics.json").read_text())["top1_error"] <= 1
    # One line for the one epoch: "21/21 - 2s - 88ms/step - accuracy: ...".
    assert len(re.findall(r"^\d+/\d+ - .*loss", proc.stdout, re.M)) == 1
    assert "\r" not in proc.stdout  # No progress bar without a terminal.
    assert f"Wrote {workdir}/metrics.json" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature=-1"], "error: --temperature must be > 0"),
        (["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
        (
            ["--dataset=cub", "--data_dir={tmp}/empty"],
            "'cub' (tfds caltech_birds2011)",
        ),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, args, message):
    workdir = tmp_path / "run"
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run_cli(*args, f"--workdir={workdir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_cli_diverging_run_stops_with_one_line_and_status_1(tmp_path):
    workdir = tmp_path / "nan"
    # A learning rate of 1e30 overflows the weights within the first epoch.
    proc = run_cli("--flagfile=configs/smoke.flags", "--lr=1e30", f"--workdir={workdir}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: The training loss became NaN or infinite at step " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_logits_and_restores_the_policy(tmp_path, policy):
    import keras  # pylint: disable=g-import-not-at-top

    result = train.run(
        dataset="digits",
        backbone="small_convnet",
        epochs=1,
        batch_size=64,
        mixed_precision=policy,
        workdir=str(tmp_path / "run"),
        verbose=0,
    )
    net = result["model"].backbone
    assert net.get_layer("features").dtype_policy.name == policy
    assert net.output.dtype == "float32"
    assert np.isfinite(result["history"]["loss"][0]) and np.isfinite(result["metrics"]["nll"])
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.slow
def test_xla_compiled_training_runs(tmp_path):
    result = train.run(
        dataset="digits",
        backbone="small_convnet",
        epochs=1,
        batch_size=64,
        jit_compile=True,
        workdir=str(tmp_path / "run"),
        verbose=0,
    )
    assert result["model"].jit_compile is True
    assert np.isfinite(result["history"]["loss"][0]) and np.isfinite(
        result["history"]["cls_loss"][0]
    )
    assert "--jit_compile=True" in (tmp_path / "run" / "flags.txt").read_text()


def test_metrics_json_equals_an_independent_scoring_of_the_final_model(tmp_path):
    """Every score of `metrics.json` recomputed from the returned model's predictions on the
    test split, with scikit-learn and loops written here (not `cskd_tf.metrics`).

    Mutants run: in `metrics.classification_metrics`, (1) `"top5_error": top_k_error(logits,
    labels, 1)` (`test_run_writes_metrics_flags_and_checkpoints` passes: top-5 <= top-1 still
    holds): `metrics["top5_error"] == approx(top5)` fails; (2) `"aurc":
    area_under_risk_coverage(logits, labels)` (the logits ranked as if probabilities):
    `metrics["aurc"] == approx(aurc)` fails.
    """
    from scipy import special  # pylint: disable=g-import-not-at-top
    from sklearn import metrics as sk  # pylint: disable=g-import-not-at-top
    from sklearn import neighbors  # pylint: disable=g-import-not-at-top

    import keras  # pylint: disable=g-import-not-at-top

    from cskd_tf import data  # pylint: disable=g-import-not-at-top

    workdir = tmp_path / "run"
    result = train.run(
        dataset="digits", backbone="mlp", epochs=1, batch_size=64, eval_every=0,
        workdir=str(workdir), verbose=0,
    )  # fmt: skip
    metrics = json.loads((workdir / "metrics.json").read_text())
    test = sources.load_digits().test
    augment = data.Augmenter("digits").eval
    images = data.example_dataset(test.values, test.labels, 128, augment=augment)
    net = result["model"].backbone
    logits = net.predict(images.map(lambda x, y: x), verbose=0).astype(np.float64)
    features = keras.Model(net.input, net.get_layer("features").output).predict(
        images.map(lambda x, y: x), verbose=0
    )
    labels, classes = np.asarray(test.labels), np.arange(logits.shape[1])
    probs = special.softmax(logits, axis=-1)
    confidence, correct = probs.max(-1), probs.argmax(-1) == labels
    # Top-k and NLL by scikit-learn.
    top1 = 1 - sk.top_k_accuracy_score(labels, logits, k=1, labels=classes)
    top5 = 1 - sk.top_k_accuracy_score(labels, logits, k=5, labels=classes)
    assert 0 < top5 < top1  # One epoch: the two differ, so a mix-up shows.
    # AURC: the risk of the i most confident predictions, averaged over i = 1..n.
    order = sorted(range(len(labels)), key=lambda i: -confidence[i])
    risks, errors = [], 0
    for i, index in enumerate(order, 1):
        errors += not correct[index]
        risks.append(errors / i)
    # ECE over the paper's 20 equal-width bins ((m - 1)/20, m/20].
    ece = 0.0
    for m in range(20):
        inside = (confidence > m / 20) & (confidence <= (m + 1) / 20)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    # Recall@1: the nearest other test example by L2 distance of the pooled features.
    _, nearest = neighbors.NearestNeighbors(n_neighbors=2, algorithm="brute").fit(
        features
    ).kneighbors(features)
    others = np.where(nearest[:, 0] == np.arange(len(labels)), nearest[:, 1], nearest[:, 0])
    assert metrics["num_examples"] == len(labels) == 359
    assert metrics["top1_error"] == pytest.approx(top1, abs=1e-9)
    assert metrics["top5_error"] == pytest.approx(top5, abs=1e-9)
    assert metrics["nll"] == pytest.approx(sk.log_loss(labels, probs, labels=classes), rel=1e-5)
    assert metrics["aurc"] == pytest.approx(np.mean(risks), rel=1e-5)
    assert metrics["ece"] == pytest.approx(ece, abs=1e-5)
    assert metrics["recall_at_1"] == pytest.approx(np.mean(labels[others] == labels), abs=1e-9)


HELP_IMPORTS = """
import sys
from absl import flags
from cskd_tf import train

values = flags.FlagValues()
train.define_flags(values)
values(["train", "--method=kd_cskd", "--epochs=3", "--mixed_precision=mixed_float16"])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")))
"""


def test_help_and_flag_parsing_import_neither_tensorflow_nor_keras(tmp_path):
    """`--help` and the flags (every method's among them) need neither TensorFlow nor Keras,
    so they answer at once; the help names every flag and every method.

    Mutants run: (1) `import keras` at the top of `cskd_tf/methods/base.py` (the registry the
    flags are read from): `proc.stdout.strip() == "[]"` fails (Keras and TensorFlow are
    listed); (2) `import tensorflow` inside `cskd_tf.cli._parse_flags` (the command's own flag
    parsing only): the `-X importtime` list of the `--help` process names TensorFlow's modules.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", HELP_IMPORTS], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    # The command itself: `-X importtime` lists on stderr every module the process imported.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cskd_tf.train", "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]  # fmt: skip
    assert {"cskd_tf.methods", "absl.flags"} <= set(imported)  # The list is complete.
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "keras")]
    # Help asked for is an answer, not a failure (absl's own --help exits 1).
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(train.__doc__.strip().splitlines()[0])
    for name in train.define_flags(flags.FlagValues()):
        assert f"--{name}:" in proc.stdout or f"--[no]{name}:" in proc.stdout, name
    for method in methods.names():
        assert method in proc.stdout, method


@pytest.mark.parametrize("script,flag", [("tools/export.py", "--format"),
                                         ("tools/report.py", "--readme")])  # fmt: skip
def test_help_of_a_command_run_from_outside_its_module_lists_its_flags(script, flag, tmp_path):
    """`tools/*.py` and the console commands (`cskd-export`) define their flags in a module that
    is not `__main__`: their `--help` lists those flags all the same and exits 0.

    Mutant run: `_help(main, sys.argv)` removed from `cskd_tf.cli.run` (absl answers, listing
    no flag): `proc.returncode == 0` fails with 1, for both scripts.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"  {flag}:" in proc.stdout
