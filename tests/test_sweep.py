"""The Table 7 sweep: the paper's grid, one run folder per cell, the table from their metrics."""

import json
import pathlib
import subprocess
import sys

import pytest

from cskd_tf import paper, sweep
from cskd_tf.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_table7_is_the_papers_grid():
    assert len(paper.TABLE7) == 6 * 8
    assert paper.TABLE7[(4.0, 1.0)] == 21.66  # The paper's best cell, in bold.
    assert min(paper.TABLE7, key=paper.TABLE7.get) == (4.0, 1.0)
    assert paper.TABLE7[(0.1, 0.1)] == 25.16 and paper.TABLE7[(20.0, 20.0)] == 24.05
    assert paper.TABLE7[(10.0, 20.0)] == 37.50


def test_commands_name_every_cell_once(tmp_path):
    lines = sweep.commands("configs/cifar100.flags", "runs/t7", [0.5, 4], [1, 10], [0, 1])
    assert len(lines) == 8
    assert lines[0] == (
        "python -m cskd_tf.train --flagfile=configs/cifar100.flags --method=cskd "
        "--temperature=0.5 --lambda_cls=1 --seed=0 --workdir=runs/t7/T0.5-lam1-s0"
    )
    assert len({line.split("--workdir=")[1] for line in lines}) == 8


@pytest.mark.parametrize(
    "grid,message",
    [
        (([], [1.0], [0]), "The grid is empty"),
        (([0.0, 4.0], [1.0], [0]), "Temperatures must be > 0, got 0"),
        (([4.0], [-1.0], [0]), "Lambdas must be >= 0, got -1"),
    ],
)
def test_bad_grids_raise_one_sentence(grid, message):
    with pytest.raises(UserError, match=message):
        sweep.check_grid(*grid)


def test_table_is_the_mean_of_the_cells_metrics_with_the_paper_beside(tmp_path):
    for seed, error in ((0, 0.20), (1, 0.25)):
        folder = pathlib.Path(sweep.cell_folder(str(tmp_path), 4.0, 1.0, seed))
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"top1_error": error}))
    text = sweep.table(str(tmp_path), [4.0, 7.0], [1.0], [0, 1])
    assert text.splitlines() == [
        "| T \\ lambda_cls | 1 |",
        "|---|---|",
        "| 4 | 22.50 (21.66) |",  # (20 + 25) / 2; the paper's cell after it.
        "| 7 | - |",  # Not in Table 7, not run.
    ]


@pytest.mark.slow
def test_sweep_trains_each_cell_once_and_continues(tmp_path):
    root = str(tmp_path / "t7")
    lines = []
    overrides = dict(backbone="mlp", epochs=1, verbose=0)
    folders = sweep.run(
        "configs/digits.flags", root, [1.0, 4.0], [0.5], [0], log=lines.append, **overrides
    )
    assert [pathlib.Path(f).name for f in folders] == ["T1-lam0.5-s0", "T4-lam0.5-s0"]
    for folder, t in zip(folders, (1.0, 4.0)):
        flags_txt = (pathlib.Path(folder) / "flags.txt").read_text()
        assert f"--temperature={t}" in flags_txt and "--lambda_cls=0.5" in flags_txt
    errors = [json.loads((pathlib.Path(f) / "metrics.json").read_text())["top1_error"]
              for f in folders]  # fmt: skip
    assert sweep.table(root, [1.0, 4.0], [0.5], [0]).splitlines()[2:] == [
        f"| 1 | {100 * errors[0]:.2f} (23.32) |",
        f"| 4 | {100 * errors[1]:.2f} (22.03) |",
    ]
    lines.clear()
    sweep.run("configs/digits.flags", root, [1.0, 4.0], [0.5], [0], log=lines.append, **overrides)
    assert all(line.endswith("done before, skipped.") for line in lines) and len(lines) == 2


def test_tool_refuses_a_bad_list_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "tools/sweep.py", "--temperatures=4,x", f"--root={tmp_path}/r"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --temperatures must be numbers separated by commas, got '4,x'."
    )
    assert not (tmp_path / "r").exists()
    dry = subprocess.run(
        [sys.executable, "tools/sweep.py", "--dry_run", "--lambdas=1", "--temperatures=4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0 and dry.stdout.count("python -m cskd_tf.train") == 1
