"""The T x lambda_cls grid of the paper's Table 7: one training run per cell, and its table.

Each cell is an ordinary run folder, `ROOT/T{T}-lam{lambda}-s{seed}`, trained by
`cskd_tf.train.run` with the base flagfile's flags and that cell's
temperature, weight and seed. A cell whose folder already holds `metrics.json`
is not trained again, so an interrupted sweep continues where it stopped, and
`commands` lists the same cells as shell commands for a cluster.
"""

import json
import math
import os
import statistics

from cskd_tf import paper
from cskd_tf.errors import UserError


def _number(value):
    return f"{value:g}"


def cell_folder(root, temperature, lambda_cls, seed):
    """The run folder of one cell."""
    return os.path.join(root, f"T{_number(temperature)}-lam{_number(lambda_cls)}-s{seed}")


def cells(temperatures, lambdas, seeds):
    """Every `(T, lambda, seed)` of the grid, row by row."""
    for t in temperatures:
        for lam in lambdas:
            for seed in seeds:
                yield t, lam, seed


def check_grid(temperatures, lambdas, seeds):
    """Raises UserError for an empty grid, a T <= 0 or a negative lambda."""
    if not temperatures or not lambdas or not seeds:
        raise UserError("The grid is empty: give at least one temperature, lambda and seed.")
    bad_t = [t for t in temperatures if not t > 0]
    if bad_t:
        raise UserError(f"Temperatures must be > 0, got {', '.join(map(_number, bad_t))}.")
    bad_lam = [lam for lam in lambdas if not lam >= 0]
    if bad_lam:
        raise UserError(f"Lambdas must be >= 0, got {', '.join(map(_number, bad_lam))}.")


def commands(flagfile, root, temperatures, lambdas, seeds):
    """One `python -m cskd_tf.train` command per cell, for running the cells elsewhere."""
    check_grid(temperatures, lambdas, seeds)
    return [
        f"python -m cskd_tf.train --flagfile={flagfile} --method=cskd "
        f"--temperature={_number(t)} --lambda_cls={_number(lam)} --seed={seed} "
        f"--workdir={cell_folder(root, t, lam, seed)}"
        for t, lam, seed in cells(temperatures, lambdas, seeds)
    ]


def run(flagfile, root, temperatures, lambdas, seeds, log=print, **overrides):
    """Trains every cell of the grid that has no `metrics.json` yet.

    Args:
      flagfile: str. The base flagfile (e.g. `configs/cifar100.flags`).
      root: str. Folder of the cell run folders.
      temperatures, lambdas: sequences of float.
      seeds: sequence of int.
      log: callable(str). Progress lines.
      **overrides: other `cskd_tf.train.run` arguments (e.g. `epochs` for a quick look).

    Returns:
      list of the cell folders, in grid order.
    """
    from cskd_tf import train  # pylint: disable=g-import-not-at-top

    check_grid(temperatures, lambdas, seeds)
    base = train.read_flagfile(flagfile)
    base.update(overrides, method="cskd")
    folders = []
    todo = list(cells(temperatures, lambdas, seeds))
    for index, (t, lam, seed) in enumerate(todo, 1):
        folder = cell_folder(root, t, lam, seed)
        folders.append(folder)
        if os.path.isfile(os.path.join(folder, "metrics.json")):
            log(f"[{index}/{len(todo)}] {folder}: done before, skipped.")
            continue
        log(f"[{index}/{len(todo)}] {folder}: training.")
        train.run(**{**base, "temperature": t, "lambda_cls": lam, "seed": seed, "workdir": folder})
    return folders


def table(root, temperatures, lambdas, seeds, metric="top1_error"):
    """A markdown grid of `metric` (percent, mean over the seeds found), paper's Table 7 beside.

    Cells without any finished run show `-`. The paper's value follows in
    parentheses where Table 7 has the cell (top-1 error only).
    """
    check_grid(temperatures, lambdas, seeds)
    header = "| T \\ lambda_cls | " + " | ".join(_number(lam) for lam in lambdas) + " |"
    lines = [header, "|" + "---|" * (len(lambdas) + 1)]
    for t in temperatures:
        row = []
        for lam in lambdas:
            values = []
            for seed in seeds:
                path = os.path.join(cell_folder(root, t, lam, seed), "metrics.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        values.append(100.0 * json.load(f)[metric])
            text = f"{statistics.fmean(values):.2f}" if values else "-"
            reference = paper.TABLE7.get((float(t), float(lam)))
            if metric == "top1_error" and reference is not None:
                text += f" ({reference:.2f})"
            row.append(text)
        lines.append(f"| {_number(t)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def parse_floats(text, name):
    """`"0.1,4"` -> `[0.1, 4.0]`; UserError naming the flag otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{name} must be numbers separated by commas, got '{text}'.") from None
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"--{name} must be finite numbers, got '{text}'.")
    return values


def parse_ints(text, name):
    """`"0,1,2"` -> `[0, 1, 2]`; UserError naming the flag otherwise."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{name} must be integers separated by commas, got '{text}'.") from None


# --- The command line (tools/sweep.py, cskd-sweep) --------------------------------------------

_FLAGS = {}


def define_flags(flag_values=None):
    """Defines `cskd-sweep`'s flags on `flag_values` (absl's global ones by default)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    fv = dict(flag_values=flag_values or flags.FLAGS)
    string = lambda *a: flags.DEFINE_string(*a, **fv)
    return dict(
        flagfile_base=string(
            "flagfile_base", "configs/cifar100.flags", "Flagfile every cell starts from."
        ),
        root=string("root", "runs/table7", "Folder of the cells' run folders."),
        temperatures=string(
            "temperatures", ",".join(f"{t:g}" for t in paper.TABLE7_TEMPERATURES), "Values of T."
        ),
        lambdas=string(
            "lambdas", ",".join(f"{v:g}" for v in paper.TABLE7_LAMBDAS), "Values of lambda_cls."
        ),
        seeds=string("seeds", "0", "Seeds, separated by commas."),
        epochs=flags.DEFINE_integer(
            "epochs", None, "Override the flagfile's epochs (a quick look).", **fv
        ),
        data_dir=string("data_dir", None, "Override the flagfile's --data_dir."),
        dry_run=flags.DEFINE_bool(
            "dry_run", False, "Print one training command per cell and stop.", **fv
        ),
        table_only=flags.DEFINE_bool(
            "table_only", False, "Only print the table of finished cells.", **fv
        ),
    )


def main(argv):
    """Trains the grid's unfinished cells (or prints their commands) and prints the table."""
    from cskd_tf import cli as cli_lib  # pylint: disable=g-import-not-at-top

    cli_lib.no_arguments(argv)
    v = {name: flag.value for name, flag in _FLAGS.items()}
    grid = (
        parse_floats(v["temperatures"], "temperatures"),
        parse_floats(v["lambdas"], "lambdas"),
        parse_ints(v["seeds"], "seeds"),
    )
    if v["dry_run"]:
        extra = f" --data_dir={v['data_dir']}" if v["data_dir"] else ""
        print("\n".join(c + extra for c in commands(v["flagfile_base"], v["root"], *grid)))
        return
    if not v["table_only"]:
        overrides = {} if v["epochs"] is None else {"epochs": v["epochs"]}
        if v["data_dir"]:
            overrides["data_dir"] = v["data_dir"]
        run(v["flagfile_base"], v["root"], *grid, **overrides)
    text = table(v["root"], *grid)
    if os.path.isdir(v["root"]):
        with open(os.path.join(v["root"], "table.md"), "w") as f:
            f.write(text)
    print(text, end="")


def cli():
    """`cskd-sweep` and `tools/sweep.py`."""
    from cskd_tf import cli as cli_lib  # pylint: disable=g-import-not-at-top

    _FLAGS.update(define_flags())
    cli_lib.run(main)
