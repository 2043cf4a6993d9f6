r"""Prints the results table of run folders, beside the paper's numbers.

    python tools/report.py runs/                      # every run folder under runs/
    python tools/report.py runs/cub-ce-s0 runs/cub-cskd-s0 --output=results.md
    python tools/report.py runs/ --readme=README.md   # between <!-- results:begin/end -->
    python tools/report.py runs/ --metrics=top1_error,ece,ece_15,adaptive_ece,brier

Mistakes (no metrics.json, a run given twice, no README markers) print one
"error:" line and exit with status 2.
"""

from cskd_tf import report

if __name__ == "__main__":
    report.cli()
