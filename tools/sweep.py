r"""Trains the T x lambda_cls grid of the paper's Table 7 and prints its table.

    python tools/sweep.py --flagfile_base=configs/cifar100.flags --root=runs/table7
    python tools/sweep.py --root=runs/table7 --dry_run     # the commands, one per cell
    python tools/sweep.py --root=runs/table7 --table_only  # the table of the finished cells

Rerun the same command to continue an interrupted sweep: finished cells are
skipped. The table (`ROOT/table.md`) puts the paper's number beside each cell.
"""

import os

from absl import flags

from cskd_tf import cli, paper, sweep

_BASE = flags.DEFINE_string(
    "flagfile_base", "configs/cifar100.flags", "Flagfile every cell starts from."
)
_ROOT = flags.DEFINE_string("root", "runs/table7", "Folder of the cells' run folders.")
_TEMPERATURES = flags.DEFINE_string(
    "temperatures", ",".join(f"{t:g}" for t in paper.TABLE7_TEMPERATURES), "Values of T."
)
_LAMBDAS = flags.DEFINE_string(
    "lambdas", ",".join(f"{v:g}" for v in paper.TABLE7_LAMBDAS), "Values of lambda_cls."
)
_SEEDS = flags.DEFINE_string("seeds", "0", "Seeds, separated by commas.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override the flagfile's epochs (a quick look).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override the flagfile's --data_dir.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one training command per cell and stop.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Only print the table of finished cells.")


def main(argv):
    cli.no_arguments(argv)
    temperatures = sweep.parse_floats(_TEMPERATURES.value, "temperatures")
    lambdas = sweep.parse_floats(_LAMBDAS.value, "lambdas")
    seeds = sweep.parse_ints(_SEEDS.value, "seeds")
    grid = (temperatures, lambdas, seeds)
    if _DRY_RUN.value:
        extra = f" --data_dir={_DATA_DIR.value}" if _DATA_DIR.value else ""
        print("\n".join(c + extra for c in sweep.commands(_BASE.value, _ROOT.value, *grid)))
        return
    if not _TABLE_ONLY.value:
        overrides = {} if _EPOCHS.value is None else {"epochs": _EPOCHS.value}
        if _DATA_DIR.value:
            overrides["data_dir"] = _DATA_DIR.value
        sweep.run(_BASE.value, _ROOT.value, *grid, **overrides)
    text = sweep.table(_ROOT.value, *grid)
    if os.path.isdir(_ROOT.value):
        with open(os.path.join(_ROOT.value, "table.md"), "w") as f:
            f.write(text)
    print(text, end="")


if __name__ == "__main__":
    cli.run(main)
