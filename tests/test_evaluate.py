import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from cskd_tf import data
from cskd_tf import evaluate
from cskd_tf import figures
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


@pytest.mark.slow
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


@pytest.mark.slow
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


CALIBRATION = ("ece_15", "adaptive_ece", "classwise_ece", "mce", "brier")


@pytest.mark.slow  # One evaluation pass with all the figures: about 20 s on two busy cores.
def test_a_grouped_data_set_gets_figure_4_and_a_run_its_learning_curves(
    runs, tmp_path, monkeypatch
):
    # The mixed set needs CUB, Dogs and MIT67; digits with its ten classes put in three groups
    # takes the same path through evaluate (the groups come from the data source).
    load = data.load
    names = ("low", "mid", "high")

    def grouped(name, data_dir=None):
        source = load(name, data_dir)
        assert source.num_classes == 10
        return dataclasses.replace(source, groups=(0,) * 3 + (1,) * 4 + (2,) * 3, group_names=names)

    monkeypatch.setattr(data, "load", grouped)
    plotted = {}
    for name in ("plot_hierarchical_confusion", "plot_learning_curves"):

        def keep(*args, _name=name, _plot=getattr(figures, name), **kwargs):
            plotted[_name] = _plot(*args, **kwargs)
            return plotted[_name]

        monkeypatch.setattr(figures, name, keep)
    out = tmp_path / "grouped"
    result = evaluate.run([runs["cskd"]], out=str(out))
    assert list(result["figures"]) == [*evaluate.FIGURES, *evaluate.OPTIONAL_FIGURES]
    for name, path in result["figures"].items():
        assert path == str(out / f"{name}.png") and (out / f"{name}.png").read_bytes()[:8] == PNG
    scores = read_json(out / "metrics.json")["CS-KD"]
    # Figure 4 draws the numbers metrics.json reports.
    figure_4 = plotted["plot_hierarchical_confusion"]["CS-KD"]
    assert figure_4["hierarchical_accuracy"] == scores["hierarchical_accuracy"]
    for g, name in enumerate(names):
        assert figure_4["confusion"][g, g] == scores[f"group_hierarchical_accuracy_{name}"]
        assert figure_4["top1_error"][g] == scores[f"group_top1_error_{name}"]
    assert figure_4["count"].sum() == scores["num_examples"] == 359
    # The learning curves draw the run's history.csv, read here with the csv module.
    with open(os.path.join(runs["cskd"], "history.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    curves = plotted["plot_learning_curves"]["CS-KD"]
    for series, column, scale in (
        ("loss", "loss", 1.0),
        ("cls_loss", "cls_loss", 1.0),
        ("val_top1_error", "val_top1_error", 100.0),
        ("val_ece", "val_ece", 100.0),
    ):
        assert curves[series]["value"].tolist() == pytest.approx(
            [scale * float(row[column]) for row in rows]
        )
        assert curves[series]["epoch"].tolist() == [int(row["epoch"]) + 1 for row in rows]
    assert curves["train_top1_error"]["value"].tolist() == pytest.approx(
        [100 * (1 - float(row["accuracy"])) for row in rows]
    )
    # The calibration metrics other papers compare: in evaluate's metrics.json as in the run's.
    own = read_json(os.path.join(runs["cskd"], "metrics.json"))
    for key in CALIBRATION:
        assert scores[key] == pytest.approx(own[key], abs=1e-6), key
        assert 0 <= scores[key] <= (2 if key == "brier" else 1)
        assert f"val_{key}" not in rows[0]  # Not in the per-epoch logs.
