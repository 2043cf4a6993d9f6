r"""Trains the T x lambda_cls grid of the paper's Table 7 and prints its table.

    python tools/sweep.py --flagfile_base=configs/cifar100.flags --root=runs/table7
    python tools/sweep.py --root=runs/table7 --dry_run     # the commands, one per cell
    python tools/sweep.py --root=runs/table7 --table_only  # the table of the finished cells

Rerun the same command to continue an interrupted sweep: finished cells are
skipped. The table (`ROOT/table.md`) puts the paper's number beside each cell.
"""

from cskd_tf import sweep

if __name__ == "__main__":
    sweep.cli()
