r"""Prints the results table of run folders, beside the paper's numbers.

    python tools/report.py runs/                      # every run folder under runs/
    python tools/report.py runs/cub-ce-s0 runs/cub-cskd-s0 --output=results.md
    python tools/report.py runs/ --readme=README.md   # between <!-- results:begin/end -->
    python tools/report.py runs/ --metrics=top1_error,ece,ece_15,adaptive_ece,brier

Mistakes (no metrics.json, a run given twice, no README markers) print one
"error:" line and exit with status 2.
"""

import sys

from absl import flags

from cskd_tf import cli, report
from cskd_tf.errors import UserError

_OUTPUT = flags.DEFINE_string("output", None, "Also write the table to this file.")
_METRICS = flags.DEFINE_list(
    "metrics",
    list(report.METRICS),
    "The metrics.json keys to tabulate, in column order: "
    f"{', '.join(report.METRICS)} (each beside the paper's number), "
    f"{', '.join(report.OTHER_METRICS)}, group_top1_error_<group>, "
    "group_hierarchical_accuracy_<group>, any of these with val_ in front (the validation "
    "split), or any other numeric key.",
)
_README = flags.DEFINE_string(
    "readme",
    None,
    f"Replace the text between the lines {report.BEGIN_MARKER} and {report.END_MARKER} "
    "of this file with the table.",
)


def main(argv):
    if len(argv) < 2:
        raise UserError("Give one or more run folders, e.g. python tools/report.py runs/")
    table, changed = report.write_report(
        argv[1:], output=_OUTPUT.value, readme=_README.value, metrics=_METRICS.value
    )
    print(table, end="")
    if changed is not None:
        print(
            f"{_README.value}: {'updated' if changed else 'already up to date'}.", file=sys.stderr
        )


if __name__ == "__main__":
    cli.run(main)
