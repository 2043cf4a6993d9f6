import json
import os
import pathlib
import subprocess
import sys

import pytest

from cskd_tf import evaluate
from cskd_tf import train
from cskd_tf.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCORES = ("top1_error", "top5_error", "nll", "ece", "aurc", "recall_at_1")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CE and a CS-KD run on digits (tiny MLP, two epochs, a validation split)."""
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for method in ("ce", "cskd"):
        folders[method] = str(root / method)
        train.run(
            dataset="digits",
            backbone="mlp",
            method=method,
            epochs=2,
            batch_size=64,
            val_split=0.1,
            workdir=folders[method],
            verbose=0,
        )
    return folders


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_scores_equal_the_runs_own_metrics_and_figures_are_written(runs, tmp_path):
    out = tmp_path / "compare"
    result = evaluate.run([runs["ce"], runs["cskd"]], out=str(out))
    written = read_json(out / "metrics.json")
    assert list(written) == ["CE", "CS-KD"]
    for label, method in (("CE", "ce"), ("CS-KD", "cskd")):
        own = read_json(os.path.join(runs[method], "metrics.json"))
        for key in SCORES:  # The last checkpoint is the model that wrote metrics.json.
            assert written[label][key] == pytest.approx(own[key], abs=1e-6), (label, key)
        assert written[label]["num_examples"] == 359
    for name in evaluate.FIGURES:
        path = out / f"{name}.png"
        assert result["figures"][name] == str(path)
        assert path.read_bytes()[:8] == PNG


def test_validation_split_scores_equal_the_runs_val_metrics(runs, tmp_path):
    own = read_json(os.path.join(runs["cskd"], "metrics.json"))
    result = evaluate.run([runs["cskd"]], split="val", out=str(tmp_path / "v"))
    scores = result["metrics"]["CS-KD"]
    assert scores["num_examples"] == own["val_num_examples"] == 143
    for key in SCORES:
        assert scores[key] == pytest.approx(own[f"val_{key}"], abs=1e-6), key
    best = evaluate.run([runs["cskd"]], split="val", checkpoint="best", out=str(tmp_path / "b"))
    assert best["metrics"]["CS-KD"]["checkpoint"].endswith("best.keras")


def test_one_run_writes_into_its_eval_folder(runs):
    result = evaluate.run([runs["ce"]], labels=["baseline"])
    assert result["out"] == os.path.join(runs["ce"], "eval")
    assert list(read_json(os.path.join(result["out"], "metrics.json"))) == ["baseline"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(runs=[]), "Name at least one run folder"),
        (dict(runs=["{tmp}/nope"]), "does not exist"),
        (dict(runs=["{ce}", "{cskd}"]), "Name an output folder with --out"),
        (dict(runs=["{ce}", "{cskd}"], labels=["a"], out="{tmp}/o"), "--labels names 1 runs"),
        (dict(runs=["{tmp}"]), "flags.txt does not exist"),
    ],
)
def test_mistakes_raise_one_sentence_and_write_nothing(runs, tmp_path, kwargs, message):
    names = dict(tmp=tmp_path, **runs)
    kwargs = {
        k: [v.format(**names) for v in value] if isinstance(value, list) else value.format(**names)
        for k, value in kwargs.items()
    }
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        evaluate.run(**kwargs)
    assert sorted(os.listdir(tmp_path)) == before


def test_runs_of_different_data_are_not_compared(runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "last.keras").write_bytes(b"")
    flags = open(os.path.join(runs["ce"], "flags.txt")).read()
    (other / "flags.txt").write_text(flags.replace("--dataset=digits", "--dataset=cifar100"))
    with pytest.raises(UserError, match="was not trained on the evaluation data"):
        evaluate.run([runs["ce"], str(other)], out=str(tmp_path / "o"))


@pytest.mark.slow
def test_cli_prints_a_table_and_errors_exit_2(runs, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "cskd_tf.evaluate"]
    ok = subprocess.run(
        [*command, f"--run={runs['ce']}", f"--run={runs['cskd']}", f"--out={tmp_path / 'c'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    ce = read_json(os.path.join(runs["ce"], "metrics.json"))
    assert f"{100 * ce['top1_error']:12.2f}%" in ok.stdout.splitlines()[1]
    bad = subprocess.run(
        [*command, f"--run={runs['ce']}", f"--run={runs['cskd']}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: Name an output folder with --out when comparing runs."
    )
