r"""Scores trained runs and draws the paper's analysis figures.

    python -m cskd_tf.evaluate --run=runs/digits-cskd-s0
    python -m cskd_tf.evaluate --run=runs/digits-ce-s0 --run=runs/digits-cskd-s0 \
        --out=runs/digits-ce-vs-cskd

For each run folder (its `checkpoints/last.keras`, or `best.keras` with
`--checkpoint=best`) or export folder of `tools/export.py` (through its
SavedModel signatures, with its fitted temperature) one prediction pass over the test split (or, with
`--split=val`, the run's validation split) gives logits and pooled features.
`--out` receives `metrics.json` (per run: top-1 / top-5 error, NLL, ECE, AURC,
recall@1, the calibration metrics other papers compare (`ece_15`, `adaptive_ece`,
`classwise_ece`, `mce`, `brier`; see `cskd_tf.metrics.classification_metrics`),
as fractions) and the figures, the runs overlaid or side by side:
`reliability.png` (paper Fig. 5), `log_prob_histograms.png` (Fig. 2),
`tsne.png` (Fig. 3) and `predictive_distributions.png` (Fig. 1b); for a data set
with label groups (`--dataset=mixed`) `hierarchical_confusion.png` (Fig. 4: the
group confusion matrices and each group's fine-label error); and, from the run
folders' `history.csv` (export folders have none), `learning_curves.png` (loss
and its parts, top-1 error and ECE per epoch).
"""

import json
import os

from absl import flags

from cskd_tf import cli as cli_lib
from cskd_tf.errors import UserError

LABELS = {"ce": "CE", "cskd": "CS-KD"}
FIGURES = ("reliability", "log_prob_histograms", "tsne", "predictive_distributions")
# Written when the data set has label groups, and when a run folder has its history.csv.
OPTIONAL_FIGURES = ("hierarchical_confusion", "learning_curves")
_FLAGS = {}


def define_flags(flag_values=flags.FLAGS):
    """Defines the evaluation flags on `flag_values`; returns them by name."""
    fv = dict(flag_values=flag_values)
    return dict(
        runs=flags.DEFINE_multi_string(
            "run",
            [],
            "Run folder of cskd_tf.train, or export folder of tools/export.py; repeat to compare "
            "runs (e.g. CE, then CS-KD).",
            **fv,
        ),
        labels=flags.DEFINE_list(
            "labels",
            [],
            "Legend labels, one per --run; unset: CE / CS-KD from each run's method.",
            **fv,
        ),
        checkpoint=flags.DEFINE_enum(
            "checkpoint", "last", ("last", "best"), "Which checkpoint of each run to score.", **fv
        ),
        split=flags.DEFINE_enum(
            "split", "test", ("test", "val"), "Evaluation split (val: the run's --val_split).", **fv
        ),
        out=flags.DEFINE_string(
            "out", None, "Output folder; unset with one --run: RUN/eval.", **fv
        ),
        data_dir=flags.DEFINE_string(
            "data_dir", None, "Where the data now is, if not where the runs trained on it.", **fv
        ),
        batch_size=flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.", **fv),
    )


def _check(condition, message):
    if not condition:
        raise UserError(message)


def _labels(runs, labels, settings):
    if labels:
        _check(
            len(labels) == len(runs),
            f"--labels names {len(labels)} runs but {len(runs)} --run were given.",
        )
        return list(labels)
    names = [LABELS.get(s["method"], s["method"]) for s in settings]
    # Two runs of one method (say, two seeds) are told apart by their folders.
    return [
        f"{name} ({os.path.basename(os.path.normpath(run))})" if names.count(name) > 1 else name
        for name, run in zip(names, runs)
    ]


def run(runs, labels=(), checkpoint="last", split="test", out=None, data_dir=None, batch_size=256):
    """Scores each run on one split and writes `metrics.json` and the figures to `out`.

    Args: as the flags of the same names (`runs`: the run folders).

    Returns:
      dict with `metrics` ({label: metrics}), `figures` ({name: path}: `FIGURES`, and those
      of `OPTIONAL_FIGURES` that apply) and `out`.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    from cskd_tf import callbacks  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top
    from cskd_tf import export  # pylint: disable=g-import-not-at-top
    from cskd_tf import figures  # pylint: disable=g-import-not-at-top
    from cskd_tf import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import saving  # pylint: disable=g-import-not-at-top
    from cskd_tf import train  # pylint: disable=g-import-not-at-top

    # --- Arguments -------------------------------------------------------------
    _check(runs, "Name at least one run folder with --run.")
    _check(batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}.")
    settings, paths = [], []
    for folder in runs:
        _check(os.path.isdir(folder), f"The run folder {folder} does not exist.")
        if export.is_export(folder):  # A SavedModel: its run's flags travel with it.
            settings.append(export.read_info(folder)["train_flags"])
            paths.append(folder)
            continue
        settings.append(train.read_flagfile(os.path.join(folder, "flags.txt")))
        paths.append(os.path.join(folder, "checkpoints", f"{checkpoint}.keras"))
        hint = " (best.keras needs a run with --val_split)" if checkpoint == "best" else ""
        _check(os.path.isfile(paths[-1]), f"{paths[-1]} does not exist{hint}.")
    first = settings[0]
    for folder, s in zip(runs[1:], settings[1:]):
        _check(
            (s["dataset"], s["val_split"], s["seed"] if split == "val" else 0)
            == (first["dataset"], first["val_split"], first["seed"] if split == "val" else 0),
            f"{folder} was not trained on the evaluation data of {runs[0]}: compare runs of "
            "one data set (and, with --split=val, one --val_split and --seed).",
        )
    if split == "val":
        _check(first["val_split"] > 0, f"{runs[0]} has no validation split (--val_split=0).")
    labels = _labels(runs, labels, settings)
    if out is None:
        _check(len(runs) == 1, "Name an output folder with --out when comparing runs.")
        out = os.path.join(runs[0], "eval")
    _check(not os.path.isfile(out), f"--out={out} is a file; name a folder (it will be created).")
    histories = []  # The learning curves' input, read now so that a bad file fails early.
    for label, folder in zip(labels, runs):
        history = os.path.join(folder, "history.csv")
        if not os.path.isfile(history):
            continue
        try:
            columns = figures.read_history(history)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UserError(f"Cannot read {history}: {err}") from err
        if columns and len(next(iter(columns.values()))):  # No epoch yet: nothing to draw.
            histories.append(dict(label=label, history=columns))

    # --- Data ------------------------------------------------------------------
    source = data.load(first["dataset"], data_dir or first["data_dir"])
    if split == "val":
        _, part = data.stratified_split(source.train, first["val_split"], seed=first["seed"])
    else:
        part = source.test
    dataset = data.split_dataset(part, batch_size, augment=data.Augmenter(source.preset).eval)

    def predict(path):
        if export.is_export(path):
            return export.predict_saved_model(path, part, batch_size)
        return callbacks.predict(saving.load_model(path), dataset)

    # --- Predict ---------------------------------------------------------------
    predictions, results = [], {}
    for label, folder, path in zip(labels, runs, paths):
        out_ = predict(path)
        predictions.append(
            dict(label=label, logits=out_.logits, labels=out_.labels, features=out_.features)
        )
        results[label] = dict(
            metrics_lib.classification_metrics(
                out_.logits,
                out_.labels,
                features=out_.features,
                groups=source.groups,
                group_names=source.group_names,
            ),
            run=folder,
            checkpoint=path,
            split=split,
            dataset=first["dataset"],
        )
    for p in predictions[1:]:
        _check(
            np.array_equal(p["labels"], predictions[0]["labels"]),
            "The runs saw different evaluation examples; compare runs of one data set.",
        )

    # --- Save ------------------------------------------------------------------
    os.makedirs(out, exist_ok=True)
    paths = figures.write_all(
        predictions,
        out,
        class_names=list(source.class_names) or None,
        groups=source.groups,
        group_names=source.group_names,
        histories=histories,
    )
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return dict(metrics=results, figures=paths, out=out)


def main(argv):
    cli_lib.no_arguments(argv)
    result = run(**{name: flag.value for name, flag in _FLAGS.items()})
    columns = ("top1_error", "top5_error", "ece", "aurc", "recall_at_1")
    print("run".ljust(24) + "".join(c.rjust(13) for c in columns))
    for label, m in result["metrics"].items():
        print(label[:24].ljust(24) + "".join(f"{100 * m[c]:12.2f}%" for c in columns))
    names = ", ".join(f"{name}.png" for name in result["figures"])
    print(f"Wrote {result['out']}/metrics.json and {names}.")


def cli():
    _FLAGS.update(define_flags())
    cli_lib.run(main)


if __name__ == "__main__":
    cli()
