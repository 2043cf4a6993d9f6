"""Results table: means and stds against hand-computed values, paper numbers against the paper."""

import json
import pathlib
import subprocess
import sys

import pytest

from cskd_tf import paper, report
from cskd_tf.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Three seeds per method on the digits demo; top-5 error is 0 throughout, and the CS-KD runs
# lack recall_at_1. Folder: (method, seed, top1_error, ece, recall_at_1).
DIGITS = {
    "digits-ce-s0": ("ce", 0, 0.01, 0.05, 0.95),
    "digits-ce-s1": ("ce", 1, 0.02, 0.07, 0.96),
    "digits-ce-s2": ("ce", 2, 0.03, 0.12, 0.97),
    "digits-cskd-s0": ("cskd", 0, 0.010, 0.02, None),
    "digits-cskd-s1": ("cskd", 1, 0.010, 0.03, None),
    "digits-cskd-s2": ("cskd", 2, 0.016, 0.04, None),
}
# One CIFAR-100 seed, without recall_at_1 (as older metrics.json files are).
CIFAR_RUN = {
    "dataset": "cifar100",
    "backbone": "preact_resnet18",
    "method": "cskd",
    "seed": 0,
    "top1_error": 0.235,
    "top5_error": 0.06,
    "ece": 0.0525,
}


def _write_run(folder, **metrics):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _digits_metrics(name):
    method, seed, top1, ece, recall = DIGITS[name]
    metrics = {"dataset": "digits", "backbone": "small_convnet", "method": method, "seed": seed}
    metrics.update(top1_error=top1, top5_error=0.0, ece=ece)
    if recall is not None:
        metrics["recall_at_1"] = recall
    return metrics


@pytest.fixture(name="runs_dir")
def _runs_dir(tmp_path):
    runs = tmp_path / "runs"
    for name in DIGITS:
        _write_run(runs / name, **_digits_metrics(name))
    _write_run(runs / "cifar100-cskd-s0", **CIFAR_RUN)
    (runs / "notes").mkdir()  # No metrics.json: skipped.
    _write_run(runs / "nested" / "deeper", **CIFAR_RUN, epochs=1)  # Not immediate: skipped.
    return runs


def _cells(table):
    """Parses the table into {(data set, method): {column: cell}}."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    split = lambda line: [cell.strip() for cell in line.strip("|").split("|")]
    header = split(lines[0])
    rows = [dict(zip(header, split(line), strict=True)) for line in lines[2:]]
    return {(row["Data set"], row["Method"]): row for row in rows}


def test_parent_folder_expands_to_immediate_run_folders(runs_dir):
    runs = report.load_runs([runs_dir])
    expected = sorted([*DIGITS, "cifar100-cskd-s0"])
    assert [pathlib.Path(run["workdir"]).name for run in runs] == expected
    assert [run["workdir"] for run in runs] == [str(runs_dir / name) for name in expected]
    assert runs[0]["top1_error"] == CIFAR_RUN["top1_error"]  # cifar100-cskd-s0 sorts first.


def test_run_folder_given_directly_and_twice_is_read_once(runs_dir):
    runs = report.load_runs([runs_dir / "digits-ce-s1", runs_dir, str(runs_dir / "digits-ce-s1")])
    assert len(runs) == 7
    assert runs[0]["workdir"] == str(runs_dir / "digits-ce-s1")


def test_folder_without_metrics_is_a_user_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="No metrics.json in .*empty nor in any"):
        report.load_runs([tmp_path / "empty"])
    with pytest.raises(UserError, match="missing-folder does not exist"):
        report.load_runs([tmp_path / "missing-folder"])


def test_metrics_json_without_seed_is_a_user_error(tmp_path):
    _write_run(tmp_path / "run", dataset="digits", backbone="mlp", method="ce", top1_error=0.1)
    with pytest.raises(UserError, match="lacks seed"):
        report.load_runs([tmp_path / "run"])


def test_percent_instead_of_fraction_is_a_user_error(tmp_path):
    _write_run(tmp_path / "run", dataset="digits", backbone="mlp", method="ce", seed=0, ece=12.3)
    with pytest.raises(UserError, match="ece is 12.3, expected a fraction"):
        report.load_runs([tmp_path / "run"])


def test_summarize_mean_and_sample_std_over_seeds(runs_dir):
    rows = report.summarize(report.load_runs([runs_dir]))
    keys = [(row["dataset"], row["method"]) for row in rows]
    assert keys == [("digits", "ce"), ("digits", "cskd"), ("cifar100", "cskd")]
    ce, cskd, cifar = rows
    assert ce["seeds"] == [0, 1, 2]
    # top-1 1, 2, 3 %: mean 2, std sqrt((1 + 0 + 1) / 2) = 1.
    assert ce["metrics"]["top1_error"] == pytest.approx((2.0, 1.0))
    # ECE 5, 7, 12 %: mean 8, deviations -3, -1, 4, std sqrt(26 / 2) = 3.6056.
    assert ce["metrics"]["ece"] == pytest.approx((8.0, 13**0.5))
    assert ce["metrics"]["recall_at_1"] == pytest.approx((96.0, 1.0))
    # top-1 1.0, 1.0, 1.6 %: mean 1.2, std sqrt((0.04 + 0.04 + 0.16) / 2) = 0.3464.
    assert cskd["metrics"]["top1_error"] == pytest.approx((1.2, 0.12**0.5))
    assert cskd["metrics"]["recall_at_1"] is None
    assert cskd["paper"] is None
    assert cifar["metrics"]["top1_error"] == pytest.approx((23.5, None))  # One seed: no std.
    assert cifar["paper"]["top1_error"] == (21.99, 0.13)


def test_table_cells_mean_std_and_paper(runs_dir):
    table = report.markdown_table(report.summarize(report.load_runs([runs_dir])))
    cells = _cells(table)
    assert list(cells) == [
        ("Digits (demo)", "Cross-entropy"),
        ("Digits (demo)", "CS-KD"),
        ("CIFAR-100", "CS-KD"),
    ]
    ce = cells["Digits (demo)", "Cross-entropy"]
    assert ce["Backbone"] == "small_convnet"
    assert ce["Seeds"] == "3"
    assert ce["Top-1 err. (%)"] == "2.00 ± 1.00"
    assert ce["Top-5 err. (%)"] == "0.00 ± 0.00"
    assert ce["ECE (%)"] == "8.00 ± 3.61"
    assert ce["R@1 (%)"] == "96.00 ± 1.00"
    assert ce["Paper top-1"] == ce["Paper ECE"] == ce["Paper R@1"] == "—"
    cskd = cells["Digits (demo)", "CS-KD"]
    assert cskd["Top-1 err. (%)"] == "1.20 ± 0.35"
    assert cskd["ECE (%)"] == "3.00 ± 1.00"
    assert cskd["R@1 (%)"] == "—"  # No run reports recall_at_1.
    cifar = cells["CIFAR-100", "CS-KD"]
    assert cifar["Backbone"] == "preact_resnet18"
    assert cifar["Seeds"] == "1"
    assert cifar["Top-1 err. (%)"] == "23.50"
    assert cifar["Paper top-1"] == "21.99 ± 0.13"
    assert cifar["Top-5 err. (%)"] == "6.00"
    assert cifar["Paper top-5"] == "5.69 ± 0.03"
    assert cifar["ECE (%)"] == "5.25"
    assert cifar["Paper ECE"] == "5.17 ± 0.40"
    assert cifar["R@1 (%)"] == "—"  # An older metrics.json without recall_at_1.
    assert cifar["Paper R@1"] == "71.15 ± 0.15"
    footer = table.rstrip("\n").splitlines()[-1]
    assert footer.startswith("Mean ± sample standard deviation (ddof=1) over seeds")
    assert "7 runs: " in footer
    assert str(runs_dir / "digits-ce-s0") in footer


def test_metric_reported_by_some_seeds_only_shows_its_count(tmp_path):
    for seed, recall in enumerate([0.5, 0.6, None]):
        metrics = {"dataset": "cub", "backbone": "resnet18", "method": "cskd", "seed": seed}
        metrics["top1_error"] = 0.3
        if recall is not None:
            metrics["recall_at_1"] = recall
        _write_run(tmp_path / f"s{seed}", **metrics)
    cells = _cells(report.markdown_table(report.summarize(report.load_runs([tmp_path]))))
    row = cells["CUB-200-2011", "CS-KD"]
    assert row["Top-1 err. (%)"] == "30.00 ± 0.00"
    assert row["R@1 (%)"] == "55.00 ± 7.07 (n=2)"  # 50, 60: std 10 / sqrt(2).
    assert row["Paper top-1"] == "33.28 ± 0.99"
    assert row["Paper R@1"] == "59.06 ± 0.38"


def test_unknown_method_keeps_its_name_and_sorts_after_known_ones(tmp_path):
    for name, method in [("a", "my_method"), ("b", "cskd"), ("c", "ce")]:
        _write_run(tmp_path / name, dataset="mit67", backbone="resnet18", method=method, seed=0)
    rows = report.summarize(report.load_runs([tmp_path]))
    assert [row["method"] for row in rows] == ["ce", "cskd", "my_method"]
    assert list(_cells(report.markdown_table(rows))) == [
        ("MIT67", "Cross-entropy"),
        ("MIT67", "CS-KD"),
        ("MIT67", "my_method"),
    ]


def test_duplicate_seed_is_a_user_error(runs_dir):
    _write_run(runs_dir / "digits-ce-s0-again", **_digits_metrics("digits-ce-s0"))
    runs = report.load_runs([runs_dir])
    with pytest.raises(UserError, match="digits/small_convnet/ce with seed 0"):
        report.summarize(runs)


README_BEFORE = """# Title

Intro.

<!-- results:begin -->
| old | table |
<!-- results:end -->

Outro.
"""


def test_update_readme_replaces_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README_BEFORE)
    assert report.update_readme(readme, "| new |\n|---|\n")
    assert readme.read_text() == (
        "# Title\n\nIntro.\n\n<!-- results:begin -->\n\n| new |\n|---|\n\n"
        "<!-- results:end -->\n\nOutro.\n"
    )
    assert not report.update_readme(readme, "| new |\n|---|\n")  # Same table: unchanged.


def test_update_readme_without_markers_raises_and_leaves_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n<!-- results:begin -->\nno end marker\n")
    with pytest.raises(UserError, match="results:end"):
        report.update_readme(readme, "| new |")
    assert readme.read_text() == "# Title\n<!-- results:begin -->\nno end marker\n"


def _tool(*args):
    return subprocess.run(
        [sys.executable, "tools/report.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_tool_prints_table_and_writes_output_and_readme(runs_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README_BEFORE)
    output = tmp_path / "results.md"
    result = _tool(runs_dir, f"--output={output}", f"--readme={readme}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == report.markdown_table(report.summarize(report.load_runs([runs_dir])))
    assert _cells(result.stdout)["CIFAR-100", "CS-KD"]["Paper top-1"] == "21.99 ± 0.13"
    assert output.read_text() == result.stdout
    text = readme.read_text()
    assert text.startswith("# Title\n\nIntro.\n\n<!-- results:begin -->\n\n" + result.stdout)
    assert text.endswith(result.stdout + "\n<!-- results:end -->\n\nOutro.\n")


def test_tool_folder_without_metrics_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _tool(tmp_path / "empty")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: No metrics.json in ")
    assert str(tmp_path / "empty") in lines[0]


# --- Other metrics than the paper's four (issue 14) -------------------------------------------

# Two seeds of one method with the calibration metrics and a group key; one older run without.
CALIBRATION_RUNS = {
    "s0": dict(seed=0, ece=0.10, ece_15=0.04, brier=0.30, nll=0.5, group_top1_error_bird=0.2),
    "s1": dict(seed=1, ece=0.20, ece_15=0.06, brier=0.50, nll=0.7, group_top1_error_bird=0.4),
    "s2": dict(seed=2, ece=0.30),  # Written before ece_15, brier, ... existed.
}
OTHER = ["ece", "ece_15", "adaptive_ece", "brier", "nll", "group_top1_error_bird"]


def _write_calibration_runs(root):
    for name, values in CALIBRATION_RUNS.items():
        _write_run(root / name, dataset="cub", backbone="resnet18", method="cskd", **values)
    return root


def test_table_of_other_metrics_by_hand(tmp_path):
    runs = report.load_runs([_write_calibration_runs(tmp_path)])
    rows = report.summarize(runs, OTHER)
    table = report.markdown_table(rows)  # The rows' own metrics, in the order asked.
    assert table == report.markdown_table(rows, OTHER)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == [
        "Data set", "Backbone", "Method", "Seeds",
        "ECE (%)", "Paper ECE",  # A metric of the paper keeps the paper's column ...
        "ECE-15 (%)", "Adaptive ECE (%)", "Brier (×100)", "NLL (nats)",  # ... no other does.
        "Top-1 err. bird (%)",
    ]  # fmt: skip
    row = _cells(table)["CUB-200-2011", "CS-KD"]
    assert row["Seeds"] == "3"
    assert row["ECE (%)"] == "20.00 ± 10.00"  # 10, 20, 30.
    mean, std = paper.paper_numbers("cub", "resnet18", "cskd")["ece"]
    assert row["Paper ECE"] == f"{mean:.2f} ± {std:.2f}"
    # 4 and 6 %, two of three runs: mean 5, std sqrt(2) = 1.41.
    assert row["ECE-15 (%)"] == "5.00 ± 1.41 (n=2)"
    assert row["Adaptive ECE (%)"] == "—"  # Known to the table, reported by no run.
    assert row["Brier (×100)"] == "40.00 ± 14.14 (n=2)"  # 30 and 50: std 20 / sqrt(2).
    assert row["NLL (nats)"] == "0.60 ± 0.14 (n=2)"  # As stored, not in percent.
    assert row["Top-1 err. bird (%)"] == "30.00 ± 14.14 (n=2)"
    footer = table.rstrip("\n").splitlines()[-1]
    assert "over seeds, in percent or the unit each column's title names;" in footer
    # Only (%) columns: the default wording.
    only_percent = report.markdown_table(report.summarize(runs, ["ece_15", "val_ece"]))
    assert "over seeds, in percent; no ± with one seed." in only_percent
    assert "Val. ECE (%)" in only_percent.splitlines()[0]


def test_default_metrics_are_the_papers_four(runs_dir):
    runs = report.load_runs([runs_dir])
    default = report.markdown_table(report.summarize(runs))
    assert default == report.markdown_table(report.summarize(runs, list(report.METRICS)))
    assert default == report.markdown_table(report.summarize(runs), list(report.METRICS))
    assert list(report.summarize(runs)[0]["metrics"]) == list(report.METRICS)


def test_bad_metric_lists_are_user_errors(tmp_path):
    runs = report.load_runs([_write_calibration_runs(tmp_path / "runs")])
    with pytest.raises(UserError, match="No run reports the metric 'ece15' \\(known metrics: "):
        report.summarize(runs, ["top1_error", "ece15"])
    with pytest.raises(UserError, match="Name at least one metric"):
        report.summarize(runs, [])
    with pytest.raises(UserError, match="ece_15 are named twice"):
        report.summarize(runs, ["ece_15", "ece", "ece_15"])
    # Any other numeric key that runs report is shown as stored, under its own name.
    row = _cells(report.markdown_table(report.summarize(runs, ["seed"])))["CUB-200-2011", "CS-KD"]
    assert row["seed"] == "1.00 ± 1.00"
    # Values out of their range: a Brier score lies in [0, 2], a fraction in [0, 1].
    _write_run(tmp_path / "bad" / "a", dataset="cub", backbone="r", method="ce", seed=0, brier=2.5)
    _write_run(tmp_path / "bad" / "b", dataset="cub", backbone="r", method="ce", seed=1, mce=12.0)
    _write_run(tmp_path / "bad" / "c", dataset="cub", backbone="r", method="ce", seed=2, nll="x")
    bad = report.load_runs([tmp_path / "bad"])  # Not checked until asked for.
    for metric, message in (
        ("brier", "brier is 2.5, expected a value in \\[0, 2\\]"),
        ("mce", "mce is 12.0, expected a value in \\[0, 1\\]"),
        ("nll", "nll is 'x', expected a number"),
    ):
        with pytest.raises(UserError, match=message):
            report.summarize(bad, [metric])
    assert report.summarize(bad, ["top1_error"])[0]["metrics"]["top1_error"] is None


def test_tool_metrics_flag(runs_dir, tmp_path):
    _write_calibration_runs(runs_dir / "cub")
    result = _tool(runs_dir / "cub", "--metrics=ece,ece_15,brier")
    assert result.returncode == 0, result.stderr
    rows = report.summarize(report.load_runs([runs_dir / "cub"]), ["ece", "ece_15", "brier"])
    assert result.stdout == report.markdown_table(rows)
    # Naming the default columns changes nothing.
    default = _tool(runs_dir, "--metrics=top1_error,top5_error,ece,recall_at_1")
    assert default.returncode == 0, default.stderr
    assert default.stdout == _tool(runs_dir).stdout
    bad = _tool(runs_dir, "--metrics=top1_error,nope")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        bad.stderr.splitlines()[0]
    ] and bad.stderr.startswith("error: No run reports the metric 'nope'")


def test_tool_flag_error_exits_2():
    result = _tool("--no_such_flag=1", "runs")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")


def test_report_module_does_not_import_tensorflow():
    code = "import sys, cskd_tf.report; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_paper_numbers_spot_checks():
    # Hard-coded from the CVPR 2020 paper, Tables 1, 5 and 6.
    assert paper.paper_numbers("cub", "resnet18", "cskd")["top1_error"] == (33.28, 0.99)
    assert paper.paper_numbers("cifar100", "preact_resnet18", "ce")["ece"] == (15.45, 0.33)
    assert paper.paper_numbers("tiny_imagenet", "preact_resnet18", "cskd")["recall_at_1"] == (
        47.15,
        0.40,
    )
    assert paper.paper_numbers("imagenet", "resnet50", "ce") == {"top1_error": (24.0, None)}
    assert paper.paper_numbers("stanford_dogs", "densenet121", "ce") == {
        "top1_error": (33.39, 0.17)
    }
    assert paper.paper_numbers("mit67", "resnet18", "ce")["top5_error"] == (19.25, 0.53)
    assert paper.paper_numbers("imagenet", "resnext101_32x4d", "cskd") == {
        "top1_error": (21.2, None)
    }
    assert paper.paper_numbers("cifar100", "resnet18", "ce") is None  # The paper's is PreAct.
    assert paper.paper_numbers("digits", "small_convnet", "cskd") is None


def test_paper_table_shape():
    # 5 data sets x (ResNet-18 + DenseNet-121) x 2 methods, plus 3 ImageNet models x 2 methods.
    assert len(paper.PAPER) == 5 * 2 * 2 + 3 * 2
    resnet18 = [key for key in paper.PAPER if key[1] in ("resnet18", "preact_resnet18")]
    assert len(resnet18) == 10
    for key in resnet18:
        assert set(paper.PAPER[key]) == set(report.METRICS)
    for numbers in paper.PAPER.values():
        for mean, std in numbers.values():
            assert 0 < mean < 100 and (std is None or 0 < std < 2)


def test_readme_results_table_is_what_the_committed_runs_give(tmp_path, monkeypatch):
    # The README's table must come from results/ by tools/report.py, never by hand.
    root = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # The table names the run folders as given: relative paths.
    table = report.markdown_table(report.summarize(report.load_runs(["results/digits"])))
    copy = tmp_path / "README.md"
    copy.write_text((root / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    assert report.update_readme(copy, table) is False  # Already there, word for word.
    # Every registered method, seeds 0, 1 and 2.
    from cskd_tf import methods  # pylint: disable=g-import-not-at-top

    runs = report.load_runs(["results/digits"])
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, seed) for m in methods.names() for seed in (0, 1, 2)
    )
    assert len(runs) == 60
