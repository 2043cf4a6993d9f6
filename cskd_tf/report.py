"""Results table: our runs (mean ± std over seeds) beside the paper's numbers.

A run folder is what `python -m cskd_tf.train` writes; only its `metrics.json`
is read. `tools/report.py` is the command-line front end. This module imports
neither TensorFlow nor Keras.
"""

import json
import pathlib
import statistics

from cskd_tf import methods
from cskd_tf.errors import UserError
from cskd_tf.paper import paper_numbers

# Metric key in metrics.json -> (our column, the paper's column). The table's default columns.
METRICS = {
    "top1_error": ("Top-1 err. (%)", "Paper top-1"),
    "top5_error": ("Top-5 err. (%)", "Paper top-5"),
    "ece": ("ECE (%)", "Paper ECE"),
    "recall_at_1": ("R@1 (%)", "Paper R@1"),
}
# Other metrics of metrics.json that the table can show (`metrics=`; `--metrics` of
# tools/report.py), which the paper does not report: key -> (column, factor from the stored
# value to the shown one, upper bound of the stored value or None). Fractions are shown in
# percent; the multi-class Brier score, in [0, 2], times 100; NLL in nats as stored.
OTHER_METRICS = {
    "nll": ("NLL (nats)", 1.0, None),
    "aurc": ("AURC (%)", 100.0, 1.0),
    "ece_15": ("ECE-15 (%)", 100.0, 1.0),
    "adaptive_ece": ("Adaptive ECE (%)", 100.0, 1.0),
    "classwise_ece": ("Class-wise ECE (%)", 100.0, 1.0),
    "mce": ("MCE (%)", 100.0, 1.0),
    "brier": ("Brier (×100)", 100.0, 2.0),
    "hierarchical_accuracy": ("Hier. acc. (%)", 100.0, 1.0),
}
# Keys made of a prefix and a group name (the mixed set's `group_top1_error_bird`, ...).
_GROUP_METRICS = {
    "group_top1_error_": "Top-1 err. {} (%)",
    "group_hierarchical_accuracy_": "Hier. acc. {} (%)",
}
# Display names, in table order; names not listed are shown as they are, after these.
DATASET_NAMES = {
    "digits": "Digits (demo)",
    "cifar100": "CIFAR-100",
    "tiny_imagenet": "TinyImageNet",
    "cub": "CUB-200-2011",
    "stanford_dogs": "Stanford Dogs",
    "mit67": "MIT67",
    "imagenet": "ImageNet",
    "mixed": "Mixed (CUB + Dogs + MIT67)",
}
# The methods' names in tables, in the registry's (the paper's row) order: the baselines,
# then CS-KD and its combinations.
METHOD_NAMES = {name: methods.get(name).title for name in methods.names()}

BEGIN_MARKER = "<!-- results:begin -->"
END_MARKER = "<!-- results:end -->"
MISSING = "—"
_KEYS = ("dataset", "backbone", "method", "seed")


def dataset_name(dataset: str) -> str:
    """Returns the display name of a data set (the raw name if it has none)."""
    return DATASET_NAMES.get(dataset, dataset)


def method_name(method: str) -> str:
    """Returns the display name of a method (the raw name if it has none)."""
    return METHOD_NAMES.get(method, method)


def metric_column(metric: str) -> tuple[str, float, float | None]:
    """How the table shows a metrics.json key.

    Args:
        metric: str. A key of metrics.json: one of `METRICS` or `OTHER_METRICS`, a
            `group_top1_error_<group>` / `group_hierarchical_accuracy_<group>` key, any of these
            with the `val_` prefix of the validation split's copy, or any other numeric key.

    Returns:
        tuple. The column title, the factor from the stored value to the shown one, and the
        largest valid stored value (None: unchecked). A fraction is shown in percent; a key
        this module does not know is shown as stored, under its own name.
    """
    if metric in METRICS:
        return METRICS[metric][0], 100.0, 1.0
    if metric in OTHER_METRICS:
        return OTHER_METRICS[metric]
    for prefix, title in _GROUP_METRICS.items():
        if metric.startswith(prefix) and len(metric) > len(prefix):
            return title.format(metric[len(prefix) :]), 100.0, 1.0
    if metric.startswith("val_") and metric != "val_":
        title, factor, bound = metric_column(metric[len("val_") :])
        if (title, factor) != (metric[len("val_") :], 1.0):
            return "Val. " + title, factor, bound
    return metric, 1.0, None


def _known(metric: str) -> bool:
    return metric_column(metric)[:2] != (metric, 1.0)


def _check_metrics(metrics) -> tuple[str, ...]:
    """Validates a list of metric keys for `summarize` and `markdown_table`.

    Args:
        metrics: sequence of str. metrics.json keys, in column order.

    Returns:
        tuple[str, ...]. The keys.

    Raises:
        UserError: if the list is empty or names a key twice. (Whether a key `metric_column`
            does not know is in the runs' metrics.json is checked by `summarize`.)
    """
    metrics = tuple(metrics)
    if not metrics:
        raise UserError("Name at least one metric.")
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    if twice:
        raise UserError(f"The metric(s) {', '.join(twice)} are named twice.")
    return metrics


def _run_folders(path: pathlib.Path) -> list[pathlib.Path]:
    if (path / "metrics.json").is_file():
        return [path]
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    subfolders = []
    if path.is_dir():
        subfolders = [p for p in sorted(path.iterdir()) if (p / "metrics.json").is_file()]
    if not subfolders:
        raise UserError(f"No metrics.json in {path} nor in any of its immediate subfolders.")
    return subfolders


def _read_metrics(folder: pathlib.Path) -> dict:
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {path}: {err}.") from err
    if not isinstance(metrics, dict):
        raise UserError(f"{path} does not hold a JSON object.")
    missing = [key for key in _KEYS if key not in metrics]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}.")
    if not all(isinstance(metrics[key], str) for key in _KEYS[:3]) or not isinstance(
        metrics["seed"], int
    ):
        raise UserError(f"{path}: dataset, backbone and method must be strings, seed an integer.")
    for metric in METRICS:
        value = metrics.get(metric)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise UserError(f"{path}: {metric} is {value!r}, expected a fraction in [0, 1].")
    return metrics


def load_runs(paths: list) -> list[dict]:
    """Reads the metrics of run folders.

    Args:
        paths: list. Run folders (holding `metrics.json`), or parent folders, of which every
            immediate subfolder holding a `metrics.json` is taken. A folder reached twice is
            read once.

    Returns:
        list[dict]. One dict per run: its `metrics.json`, plus `workdir`, the folder as str.

    Raises:
        UserError: if `paths` is empty, a path has no `metrics.json` in it nor in its
            subfolders, or a `metrics.json` is unreadable or lacks dataset/backbone/method/seed.
    """
    if not paths:
        raise UserError("No run folders given.")
    runs, seen = [], set()
    for path in paths:
        for folder in _run_folders(pathlib.Path(path)):
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            runs.append({**_read_metrics(folder), "workdir": str(folder)})
    return runs


def _sort_key(group: tuple) -> tuple:
    dataset, backbone, method = group
    datasets, method_order = list(DATASET_NAMES), list(METHOD_NAMES)
    return (
        datasets.index(dataset) if dataset in datasets else len(datasets),
        dataset,
        backbone,
        method_order.index(method) if method in method_order else len(method_order),
        method,
    )


def _check_values(runs: list[dict], metrics: tuple) -> None:
    for metric in metrics:
        if metric in METRICS:  # Checked by load_runs.
            continue
        _, _, bound = metric_column(metric)
        reported = [run for run in runs if run.get(metric) is not None]
        if not reported and not _known(metric):
            raise UserError(
                f"No run reports the metric {metric!r} (known metrics: "
                f"{', '.join([*METRICS, *OTHER_METRICS])}, or any numeric key of metrics.json)."
            )
        for run in reported:
            value = run[metric]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (bound is not None and not 0 <= value <= bound):
                expected = "a number" if bound is None else f"a value in [0, {bound:g}]"
                raise UserError(
                    f"{pathlib.Path(run['workdir']) / 'metrics.json'}: {metric} is {value!r}, "
                    f"expected {expected}."
                )


def summarize(runs: list[dict], metrics=tuple(METRICS)) -> list[dict]:
    """Groups runs by (dataset, backbone, method) and averages each metric over seeds.

    Args:
        runs: list[dict]. As `load_runs` returns them.
        metrics: sequence of str. The metrics.json keys to average (see `metric_column`), in
            column order; the paper's four by default.

    Returns:
        list[dict]. One row per group, sorted by data set (in `DATASET_NAMES` order), backbone,
        then method (cross-entropy first), with keys `dataset`, `backbone`, `method`, `seeds`
        (sorted list), `workdirs` (list of str, in seed order), `metrics` (metric -> `(mean,
        std)` in percent, std the sample standard deviation (ddof=1), None with one seed; None
        where no run reports the metric), `counts` (metric -> number of runs that report it)
        and `paper` (the paper's `{metric: (mean, std)}`, or None). "In percent" holds for
        fractions; other metrics are scaled as `metric_column` says.

    Raises:
        UserError: if two runs share dataset, backbone, method and seed; if `metrics` is empty
            or names a key twice; if no run reports a key that `metric_column` does not know;
            or if a run's value of a requested metric is not a number in its range.
    """
    metrics = _check_metrics(metrics)
    _check_values(runs, metrics)
    groups = {}
    for run in runs:
        group = groups.setdefault((run["dataset"], run["backbone"], run["method"]), {})
        if run["seed"] in group:
            raise UserError(
                f"{group[run['seed']]['workdir']} and {run['workdir']} are both "
                f"{run['dataset']}/{run['backbone']}/{run['method']} with seed {run['seed']}; "
                "pass each run once."
            )
        group[run["seed"]] = run
    rows = []
    for key in sorted(groups, key=_sort_key):
        dataset, backbone, method = key
        seeds = sorted(groups[key])
        members = [groups[key][seed] for seed in seeds]
        row = {
            "dataset": dataset,
            "backbone": backbone,
            "method": method,
            "seeds": seeds,
            "workdirs": [run["workdir"] for run in members],
            "metrics": {},
            "counts": {},
            "paper": paper_numbers(dataset, backbone, method),
        }
        for metric in metrics:
            factor = metric_column(metric)[1]
            values = [factor * run[metric] for run in members if run.get(metric) is not None]
            row["counts"][metric] = len(values)
            if not values:
                row["metrics"][metric] = None
            else:
                std = statistics.stdev(values) if len(values) > 1 else None
                row["metrics"][metric] = (statistics.fmean(values), std)
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return MISSING
    mean, std = value
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: list[dict], metrics=None) -> str:
    """Formats `summarize` rows as a Markdown table, each metric of the paper beside the paper's.

    Args:
        rows: list[dict]. As `summarize` returns them.
        metrics: sequence of str or None. The metric columns, in order, among those the rows
            hold. None: the rows' own (the paper's four when there are no rows).

    Returns:
        str. The table, a blank line and one line saying what the numbers are and which runs
        went in. Values in percent (or in the unit the column's title names) with two
        decimals, "mean ± std" ("mean" alone with one seed); "—" where a value is missing. A
        mean over fewer runs than the row's seeds (some runs lack the metric) is followed by
        "(n=COUNT)". A metric of `METRICS` is followed by the paper's column; the others,
        which the paper does not report, are not.
    """
    if metrics is None:
        metrics = tuple(rows[0]["metrics"]) if rows else tuple(METRICS)
    metrics = _check_metrics(metrics)
    header = ["Data set", "Backbone", "Method", "Seeds"]
    for metric in metrics:
        header += list(METRICS[metric]) if metric in METRICS else [metric_column(metric)[0]]
    lines = []
    for row in rows:
        cells = [
            dataset_name(row["dataset"]),
            row["backbone"],
            method_name(row["method"]),
            str(len(row["seeds"])),
        ]
        for metric in metrics:
            cell = _cell(row["metrics"][metric])
            if row["metrics"][metric] is not None and row["counts"][metric] < len(row["seeds"]):
                cell += f" (n={row['counts'][metric]})"
            cells.append(cell)
            if metric in METRICS:
                cells.append(_cell((row["paper"] or {}).get(metric)))
        lines.append([cell.replace("|", "\\|") for cell in cells])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    right = [i >= 3 for i in range(len(header))]  # Numbers are right-aligned.

    def join(cells):
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right)]
    workdirs = [workdir for row in rows for workdir in row["workdirs"]]
    percent = all(metric_column(metric)[0].endswith("(%)") for metric in metrics)
    unit = "in percent" if percent else "in percent or the unit each column's title names"
    footer = (
        f"Mean ± sample standard deviation (ddof=1) over seeds, {unit}; no ± with one seed. "
        f"Paper: Yun et al., CVPR 2020, Tables 1 to 6; {MISSING}: not reported. "
        f"{len(workdirs)} run{'s' if len(workdirs) != 1 else ''}: {', '.join(workdirs)}."
    )
    return "\n".join([join(header), join(rule), *map(join, lines), "", footer]) + "\n"


def update_readme(
    readme_path, table: str, begin_marker=BEGIN_MARKER, end_marker=END_MARKER
) -> bool:
    """Puts `table` between two marker lines of a README (the results markers by default).

    Args:
        readme_path: str | os.PathLike. The file to update, e.g. README.md.
        table: str. What goes between the marker lines (kept), with a blank line either side.
        begin_marker, end_marker: str. The lines, by default `<!-- results:begin -->` and
            `<!-- results:end -->`.

    Returns:
        bool. Whether the file changed (it is written only then).

    Raises:
        UserError: if the file cannot be read or written, or lacks the two marker lines (each
            exactly once, begin before end).
    """
    path = pathlib.Path(readme_path)
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep CRLF as it is.
            old = f.read()
    except OSError as err:
        raise UserError(f"Cannot read {path}: {err.strerror}.") from err
    lines = old.splitlines(keepends=True)
    stripped = [line.strip() for line in lines]
    if stripped.count(begin_marker) != 1 or stripped.count(end_marker) != 1:
        raise UserError(
            f"{path} needs the lines {begin_marker} and {end_marker}, each once, "
            "to put the table between."
        )
    begin, end = stripped.index(begin_marker), stripped.index(end_marker)
    if end < begin:
        raise UserError(f"In {path}, {end_marker} comes before {begin_marker}.")
    newline = "\r\n" if lines[begin].endswith("\r\n") else "\n"
    body = "\n" + table.strip("\n") + "\n\n"
    new = "".join(lines[: begin + 1]) + body.replace("\n", newline) + "".join(lines[end:])
    if new == old:
        return False
    try:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(new)
    except OSError as err:
        raise UserError(f"Cannot write {path}: {err.strerror}.") from err
    return True


def write_report(
    paths: list, output=None, readme=None, metrics=tuple(METRICS)
) -> tuple[str, bool | None]:
    """Builds the table from run folders, and writes it where asked.

    Args:
        paths: list. Run folders or their parents, as for `load_runs`.
        output: str | os.PathLike | None. File to write the table to.
        readme: str | os.PathLike | None. File whose results section `update_readme` replaces.
        metrics: sequence of str. The metric columns, in order, as for `summarize`.

    Returns:
        tuple[str, bool | None]. The table, and whether the README changed (None without one).

    Raises:
        UserError: as `load_runs`, `summarize` and `update_readme`, or if `output` cannot be
            written.
    """
    table = markdown_table(summarize(load_runs(paths), metrics), metrics)
    if output:
        try:
            pathlib.Path(output).write_text(table, encoding="utf-8")
        except OSError as err:
            raise UserError(f"Cannot write {output}: {err.strerror}.") from err
    changed = update_readme(readme, table) if readme else None
    return table, changed


# --- The command line (tools/report.py, cskd-report) ------------------------------------------

_FLAGS = {}


def define_flags(flag_values=None):
    """Defines `cskd-report`'s flags on `flag_values` (absl's global ones by default)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    fv = dict(flag_values=flag_values or flags.FLAGS)
    return dict(
        output=flags.DEFINE_string("output", None, "Also write the table to this file.", **fv),
        metrics=flags.DEFINE_list(
            "metrics",
            list(METRICS),
            "The metrics.json keys to tabulate, in column order: "
            f"{', '.join(METRICS)} (each beside the paper's number), "
            f"{', '.join(OTHER_METRICS)}, group_top1_error_<group>, "
            "group_hierarchical_accuracy_<group>, any of these with val_ in front (the "
            "validation split), or any other numeric key.",
            **fv,
        ),
        readme=flags.DEFINE_string(
            "readme",
            None,
            f"Replace the text between the lines {BEGIN_MARKER} and {END_MARKER} "
            "of this file with the table.",
            **fv,
        ),
    )


def main(argv):
    """Prints (and writes where the flags say) the table of the run folders in `argv`."""
    import sys  # pylint: disable=g-import-not-at-top

    if len(argv) < 2:
        raise UserError("Give one or more run folders, e.g. cskd-report runs/")
    values = {name: flag.value for name, flag in _FLAGS.items()}
    table, changed = write_report(
        argv[1:], output=values["output"], readme=values["readme"], metrics=values["metrics"]
    )
    print(table, end="")
    if changed is not None:
        print(
            f"{values['readme']}: {'updated' if changed else 'already up to date'}.",
            file=sys.stderr,
        )


def cli():
    """`cskd-report` and `tools/report.py`."""
    from cskd_tf import cli as cli_lib  # pylint: disable=g-import-not-at-top

    _FLAGS.update(define_flags())
    cli_lib.run(main)
