"""The paper's analysis figures, drawn from saved predictions (CVPR 2020, Figures 1b, 2-5).

Every function takes `runs`, a list of predictions of trained classifiers on one evaluation
set, each a dict:

    {"label": "CS-KD",      # str, used in legends and titles; unique across runs
     "logits": [N, C],      # float
     "labels": [N],         # int, identical (same examples, same order) in every run
     "features": [N, D]}    # float, pooled penultimate features; only plot_tsne needs them

`plot_learning_curves` instead takes the per-epoch logs of runs (`read_history` reads a run
folder's `history.csv`).

Each `plot_*` function writes one PNG and returns the numbers it plotted, so that tests can
check them against an independent computation. Figures are built with matplotlib's object API
(`matplotlib.figure.Figure`), never `pyplot`: no global figure state and no display backend,
so this runs headless.
"""

import csv
import os

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import special
from sklearn import manifold

from cskd_tf import metrics

DPI = 120
_RUN_KEYS = ("label", "logits", "labels")


# ----------------------------------------------------------------------------------------------
# Input checks and shared computations.
# ----------------------------------------------------------------------------------------------


def _check_runs(runs, need_features=False):
    """Validates `runs` and returns them as dicts of numpy arrays (logits in float64).

    Raises:
        ValueError: a run lacks a key, has arrays of inconsistent shapes, or its labels
            differ from the first run's.
    """
    if isinstance(runs, dict) or not isinstance(runs, (list, tuple)) or not runs:
        raise ValueError("runs must be a non-empty list of dicts with label, logits and labels.")
    keys = _RUN_KEYS + (("features",) if need_features else ())
    checked = []
    for i, run in enumerate(runs):
        missing = [key for key in keys if key not in run]
        if missing:
            raise ValueError(f"Run {i} lacks the key(s) {', '.join(missing)}.")
        label = str(run["label"])
        logits = np.asarray(run["logits"], np.float64)
        labels = np.asarray(run["labels"])
        if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
            raise ValueError(
                f"Run '{label}' has logits of shape {logits.shape}; expected [N, C], N >= 1, C >= 2."
            )
        if labels.shape != (logits.shape[0],):
            raise ValueError(
                f"Run '{label}' has labels of shape {labels.shape} for {logits.shape[0]} logits."
            )
        # Labels that went through a float tensor are accepted if they are whole numbers.
        if not np.issubdtype(labels.dtype, np.integer) and not np.all(labels == np.round(labels)):
            raise ValueError(f"Run '{label}' has labels that are not integers.")
        labels = labels.astype(np.int64)
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError(
                f"Run '{label}' has labels outside [0, {logits.shape[1]}), the logits' classes."
            )
        entry = {"label": label, "logits": logits, "labels": labels}
        if need_features:
            features = np.asarray(run["features"], np.float64)
            if features.ndim != 2 or features.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"Run '{label}' has features of shape {features.shape}; "
                    f"expected [{logits.shape[0]}, D]."
                )
            entry["features"] = features
        checked.append(entry)
    first = checked[0]
    for run in checked[1:]:
        if run["logits"].shape != first["logits"].shape or not np.array_equal(
            run["labels"], first["labels"]
        ):
            raise ValueError(
                f"Run '{run['label']}' does not share the examples and labels of run "
                f"'{first['label']}'; all runs must predict the same examples in the same order."
            )
    names = [run["label"] for run in checked]
    if len(set(names)) != len(names):
        # Results are returned keyed by label, so two runs with one label would collide.
        raise ValueError(f"Run labels must be unique; got {names}.")
    return checked


def _refuse_label_indices(runs):
    if any(run["label"] == "indices" for run in runs):
        raise ValueError(
            "A run labelled 'indices' would collide with plot_tsne's returned indices."
        )


def _save(fig, path):
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _run_colour(i):
    return f"C{i % 10}"


def _class_name(class_names, c):
    return str(class_names[c]) if class_names is not None else str(c)


def _check_class_names(class_names, num_classes):
    if class_names is not None and len(class_names) < num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries for {num_classes} classes.")


def _every(runs):
    return "both runs" if len(runs) == 2 else f"all {len(runs)} runs"


def _misclassified(run):
    return np.flatnonzero(np.argmax(run["logits"], axis=-1) != run["labels"])


# ----------------------------------------------------------------------------------------------
# Figure 5: reliability diagram.
# ----------------------------------------------------------------------------------------------


def reliability_bins(probs, labels, num_bins=20):
    """Accuracy and mean confidence per equal-width bin of the max-softmax confidence.

    Bin `m` (0-based) holds the confidences in `(m / M, (m + 1) / M]`, and a confidence of
    exactly 0 joins bin 0: the convention of `metrics.expected_calibration_error`, so that
    `sum(count / N * |accuracy - confidence|)` over non-empty bins is that ECE.

    Args:
        probs: float array `[N, C]` of predicted probabilities.
        labels: int array `[N]`.
        num_bins: int. `M`; the paper uses 20.

    Returns:
        dict of numpy arrays: `accuracy` `[M]` and `confidence` `[M]` (NaN in empty bins),
        `count` `[M]` (int) and `edges` `[M + 1]` (`0, 1/M, ..., 1`).
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    hits = np.bincount(bins, weights=correct, minlength=num_bins)
    total_confidence = np.bincount(bins, weights=confidence, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, hits / count, np.nan)
        mean_confidence = np.where(count > 0, total_confidence / count, np.nan)
    return {
        "accuracy": accuracy,
        "confidence": mean_confidence,
        "count": count,
        "edges": np.linspace(0.0, 1.0, num_bins + 1),
    }


def plot_reliability(runs, path, num_bins=20):
    """Reliability diagram: accuracy per confidence bin against the diagonal (Figure 5).

    One colour per run; with several runs the bars are semi-transparent and outlined so that
    all stay visible. A lower panel shows the fraction of examples in each bin, since a bin's
    gap matters to the ECE in proportion to its size.

    Args:
        runs: list of run dicts (see the module docstring).
        path: str or os.PathLike. Where the PNG goes.
        num_bins: int. `M`; the paper uses 20.

    Returns:
        dict mapping each run's label to `reliability_bins(softmax(logits), labels, num_bins)`.
    """
    runs = _check_runs(runs)
    fig = Figure(figsize=(6.0, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], "k--", linewidth=1.2, label="Perfect calibration")
    alpha = 0.85 if len(runs) == 1 else 0.35
    results = {}
    for i, run in enumerate(runs):
        probs = special.softmax(run["logits"], axis=-1)
        result = reliability_bins(probs, run["labels"], num_bins)
        results[run["label"]] = result
        ece = metrics.expected_calibration_error(probs, run["labels"], num_bins)
        filled = result["count"] > 0
        colour = _run_colour(i)
        top.bar(
            result["edges"][:-1][filled],
            result["accuracy"][filled],
            width=1.0 / num_bins,
            align="edge",
            color=colour,
            alpha=alpha,
            edgecolor=colour,
            linewidth=0.8,
            label=f"{run['label']} (ECE {100 * ece:.2f}%)",
        )
        # The outline keeps each run's bars readable where the translucent fills overlap.
        top.stairs(
            np.where(filled, result["accuracy"], 0.0), result["edges"], color=colour, linewidth=1.5
        )
        bottom.stairs(
            result["count"] / len(run["labels"]),
            result["edges"],
            color=colour,
            linewidth=1.5,
            fill=len(runs) == 1,
            alpha=alpha if len(runs) == 1 else 1.0,
        )
    top.set_xlim(0.0, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("Accuracy")
    top.set_title("Reliability diagram")
    # "best" keeps the legend off the bars, wherever a run's miscalibration puts them.
    top.legend(loc="best", framealpha=0.9)
    top.grid(alpha=0.3)
    bottom.set_xlabel("Confidence")
    bottom.set_ylabel("Fraction of\nexamples")
    bottom.set_ylim(0.0, None)
    bottom.grid(alpha=0.3)
    _save(fig, path)
    return results


# ----------------------------------------------------------------------------------------------
# Figure 2: log-probabilities on misclassified examples.
# ----------------------------------------------------------------------------------------------


def misclassified_together(runs):
    """Indices of the examples that every run misclassifies (`argmax(logits) != label`).

    Figure 2 compares the methods on these "samples commonly misclassified by both", so that
    every histogram covers the same examples.

    Args:
        runs: list of run dicts (see the module docstring).

    Returns:
        int array of increasing indices into the evaluation set (possibly empty).
    """
    runs = _check_runs(runs)
    wrong = np.ones(len(runs[0]["labels"]), bool)
    for run in runs:
        wrong &= np.argmax(run["logits"], axis=-1) != run["labels"]
    return np.flatnonzero(wrong)


def plot_log_prob_histograms(runs, path, bins=30):
    """Histograms of log P(predicted class) and log P(true class) on misclassified examples.

    Figure 2: (a) how confident each run is in its wrong answer, (b) how much probability it
    still gives the right one. The examples are those misclassified by every run; if there are
    none, each run's own misclassified examples are used instead and the title says so.

    Args:
        runs: list of run dicts (see the module docstring).
        path: str or os.PathLike. Where the PNG goes.
        bins: int. Number of histogram bins, shared by all runs within a panel.

    Returns:
        dict mapping each run's label to `{"predicted": array, "true": array}`, the natural
        log-probabilities plotted (empty arrays where a run has no misclassified example).
    """
    runs = _check_runs(runs)
    common = misclassified_together(runs)
    own = common.size == 0 and len(runs) > 1
    values = {}
    for run in runs:
        index = _misclassified(run) if own else common
        log_probs = special.log_softmax(run["logits"][index], axis=-1)
        predicted = np.argmax(run["logits"][index], axis=-1)
        rows = np.arange(len(index))
        values[run["label"]] = {
            "predicted": log_probs[rows, predicted],
            "true": log_probs[rows, run["labels"][index]],
        }

    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        ("predicted", "(a) Predicted class", "log-probability of the predicted class"),
        ("true", "(b) True class", "log-probability of the true class"),
    )
    shown = sum(len(v["predicted"]) for v in values.values())
    for ax, (key, title, xlabel) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Examples")
        if shown == 0:
            ax.text(
                0.5,
                0.5,
                "No misclassified examples",
                ha="center",
                va="center",
                fontsize=13,
                transform=ax.transAxes,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        pooled = np.concatenate([v[key] for v in values.values()])
        lo, hi = pooled.min(), pooled.max()
        if hi - lo < 1e-3:
            # Nearly equal values (say one example per run) would give bins a few ulps wide
            # and an unreadable offset axis; widen to one unit around them.
            lo, hi = (lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5
        # Shared edges, so that bar heights compare across runs.
        edges = np.linspace(lo, hi, bins + 1)
        for i, run in enumerate(runs):
            data = values[run["label"]][key]
            if data.size == 0:
                continue
            ax.hist(
                data,
                bins=edges,
                color=_run_colour(i),
                alpha=0.5 if len(runs) > 1 else 0.8,
                edgecolor=_run_colour(i),
                linewidth=1.0,
                label=f"{run['label']} (mean {data.mean():.2f}, n={data.size})",
            )
        ax.legend()
        ax.grid(alpha=0.3)
    if shown == 0:
        suptitle = "Log-probabilities: no misclassified examples"
    elif own:
        counts = ", ".join(f"{label}: {len(v['predicted'])}" for label, v in values.items())
        suptitle = (
            "Log-probabilities on each run's own misclassified examples "
            f"(none is misclassified by every run; {counts})"
        )
    elif len(runs) == 1:
        suptitle = f"Log-probabilities on the {common.size} misclassified examples"
    else:
        suptitle = (
            f"Log-probabilities on the {common.size} examples misclassified by {_every(runs)}"
        )
    fig.suptitle(suptitle)
    _save(fig, path)
    return values


# ----------------------------------------------------------------------------------------------
# Figure 3: t-SNE of penultimate features.
# ----------------------------------------------------------------------------------------------


def _tsne_indices(labels, max_classes, max_points, seed):
    """The examples of the `max_classes` lowest class ids, subsampled to `max_points`."""
    classes = np.unique(labels)[:max_classes]
    index = np.flatnonzero(np.isin(labels, classes))
    if len(index) > max_points:
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(index, size=max_points, replace=False))
    return index


def _class_colours(num_classes):
    if num_classes <= 10:
        return [f"C{c}" for c in range(num_classes)]
    from matplotlib import colormaps  # Only needed past ten classes.

    cmap = colormaps["tab20" if num_classes <= 20 else "turbo"]
    return [cmap(c / max(num_classes - 1, 1)) for c in range(num_classes)]


def plot_tsne(runs, path, max_classes=10, max_points=2000, seed=0, class_names=None):
    """t-SNE of the penultimate features, one panel per run, coloured by class (Figure 3).

    Every run embeds the same examples: those whose label is among the `max_classes` lowest
    class ids present, subsampled without replacement to `max_points` with
    `np.random.default_rng(seed)`. Each panel's title gives the run's recall@1 on all examples
    (`metrics.recall_at_k`), the number the paper pairs with this figure (Table 6).

    Args:
        runs: list of run dicts, with `features` (see the module docstring).
        path: str or os.PathLike. Where the PNG goes.
        max_classes: int. Classes shown; more than about 10 become hard to tell apart.
        max_points: int. Examples embedded; t-SNE time grows with it.
        seed: int. Seeds the subsampling and t-SNE.
        class_names: list of str or None. Legend entries; class ids if None.

    Returns:
        dict mapping each run's label to its embedding, float array `[n, 2]`, and `"indices"`
        to the int array `[n]` of the embedded examples (shared by all runs).
    """
    runs = _check_runs(runs, need_features=True)
    _refuse_label_indices(runs)
    labels = runs[0]["labels"]
    _check_class_names(class_names, runs[0]["logits"].shape[1])
    index = _tsne_indices(labels, max_classes, max_points, seed)
    if len(index) < 4:
        raise ValueError(f"t-SNE needs at least 4 examples; the chosen classes have {len(index)}.")
    classes = np.unique(labels[index])
    colours = _class_colours(len(classes))
    # sklearn requires perplexity < n; the usual 30 only once there are enough points.
    perplexity = min(30.0, (len(index) - 1) / 3.0)

    fig = Figure(figsize=(4.8 * len(runs) + 1.6, 5.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(runs)))
    result = {}
    for ax, run in zip(axes, runs):
        tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        embedding = tsne.fit_transform(run["features"][index])
        result[run["label"]] = embedding
        recall = metrics.recall_at_k(run["features"], labels, 1)
        for colour, c in zip(colours, classes):
            points = embedding[labels[index] == c]
            ax.scatter(
                points[:, 0],
                points[:, 1],
                s=10,
                color=colour,
                alpha=0.8,
                linewidths=0,
                label=_class_name(class_names, c),
            )
        ax.set_title(f"{run['label']} (R@1 {100 * recall:.2f}%)")
        # t-SNE coordinates have no meaning of their own; ticks would only suggest one.
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="outside right center",
        title="Class",
        markerscale=2.0,
        ncols=1 if len(classes) <= 20 else 2,
    )
    fig.suptitle(f"t-SNE of penultimate features ({len(index)} examples of {len(classes)} classes)")
    _save(fig, path)
    result["indices"] = index
    return result


# ----------------------------------------------------------------------------------------------
# Figure 1b / 6: predictive distributions on misclassified examples.
# ----------------------------------------------------------------------------------------------


def _plotted_classes(probs, true_class, top):
    """The `top` classes of highest maximum probability across runs, the true class forced in.

    Args:
        probs: float array `[R, C]`, one row per run, for one example.
        true_class: int.
        top: int.

    Returns:
        int array, ordered by decreasing maximum probability.
    """
    peak = probs.max(axis=0)
    order = np.argsort(-peak, kind="stable")
    top = min(top, probs.shape[1])
    chosen = order[:top]
    if true_class not in chosen:
        chosen = np.append(order[: top - 1], true_class)
    return chosen[np.argsort(-peak[chosen], kind="stable")]


def plot_predictive_distributions(runs, path, num_samples=4, top=10, class_names=None, seed=0):
    """Softmax probabilities of each run on a few misclassified examples (Figures 1b and 6).

    The examples are drawn from those every run misclassifies: a permutation of them by
    `np.random.default_rng(seed)`, its first `num_samples`, shown in increasing index order
    (a seeded shuffle rather than the first indices, since evaluation sets are often sorted by
    class). If no example is misclassified by every run, examples misclassified by at least one
    run are used and the title says so. Each panel shows grouped bars, one per run, over the
    `top` classes with the highest maximum probability across runs; the true class is always
    among them, shaded and with a bold, red tick label.

    Args:
        runs: list of run dicts (see the module docstring).
        path: str or os.PathLike. Where the PNG goes.
        num_samples: int. Panels; fewer if fewer examples qualify.
        top: int. Classes per panel (all classes if there are fewer).
        class_names: list of str or None. Tick labels; class ids if None.
        seed: int. Seeds the choice of examples.

    Returns:
        dict: `indices`, int array of the examples shown, and `classes`, a list with, per
        example, the int array of class ids plotted (left to right).
    """
    runs = _check_runs(runs)
    labels = runs[0]["labels"]
    _check_class_names(class_names, runs[0]["logits"].shape[1])
    candidates = misclassified_together(runs)
    any_run = candidates.size == 0 and len(runs) > 1
    if any_run:
        candidates = np.unique(np.concatenate([_misclassified(run) for run in runs]))
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(candidates)[:num_samples])
    probs = np.stack([special.softmax(run["logits"][index], axis=-1) for run in runs])

    n = max(len(index), 1)
    ncols = min(n, 2)
    nrows = -(-n // ncols)
    # One panel still gets room for the two-line title.
    fig = Figure(figsize=(max(6.0 * ncols, 8.0), 4.2 * nrows + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes[len(index) :]:
        ax.set_axis_off()
    if len(index) == 0:
        axes[0].text(
            0.5,
            0.5,
            "No misclassified examples",
            ha="center",
            va="center",
            fontsize=13,
            transform=axes[0].transAxes,
        )
    plotted = []
    width = 0.8 / len(runs)
    for ax, j, example in zip(axes, range(len(index)), index):
        true_class = int(labels[example])
        classes = _plotted_classes(probs[:, j, :], true_class, top)
        plotted.append(classes)
        x = np.arange(len(classes))
        true_x = int(np.flatnonzero(classes == true_class)[0])
        ax.axvspan(true_x - 0.45, true_x + 0.45, color="tab:green", alpha=0.15, linewidth=0)
        for r, run in enumerate(runs):
            ax.bar(
                x + (r - (len(runs) - 1) / 2) * width,
                probs[r, j, classes],
                width=width,
                color=_run_colour(r),
                label=run["label"],
            )
        names = [_class_name(class_names, c) for c in classes]
        long_names = max(len(name) for name in names) > 3
        ax.set_xticks(
            x, names, rotation=45 if long_names else 0, ha="right" if long_names else "center"
        )
        tick = ax.get_xticklabels()[true_x]
        tick.set_fontweight("bold")
        tick.set_color("tab:red")
        ax.set_xlim(-0.6, len(classes) - 0.4)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("Probability")
        ax.set_title(f"true: {_class_name(class_names, true_class)} (example {example})")
        ax.grid(axis="y", alpha=0.3)
    if len(index):
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=len(runs))
    if any_run:
        what = "examples misclassified by at least one run (none by all)"
    elif len(runs) == 1:
        what = "misclassified examples"
    else:
        what = f"examples misclassified by {_every(runs)}"
    if len(index):
        fig.suptitle(f"Predictive distributions on {what}\n(true class shaded)")
    else:
        fig.suptitle("Predictive distributions: no misclassified examples")
    _save(fig, path)
    return {"indices": index, "classes": plotted}


# ----------------------------------------------------------------------------------------------
# Figure 4: hierarchical confusion of the mixed set.
# ----------------------------------------------------------------------------------------------


def _panel_letter(i):
    return f"({chr(ord('a') + i)})" if i < 26 else f"({i + 1})"


def plot_hierarchical_confusion(runs, path, groups, group_names=None):
    """Group confusion matrices and per-group fine-label error (Figure 4, mixed data set).

    One panel per run: the confusion of true group (rows) against the group of the predicted
    fine label (columns), each row normalised to sum to 1 (`metrics.hierarchical_confusion`;
    its diagonal is each group's hierarchical accuracy), the percentages written in the cells
    and the overall `metrics.hierarchical_accuracy` in the title (Figure 4a/b). A last panel
    shows, per true group, the fine-label top-1 error of each run over that group's examples
    (Figure 4c), as `metrics.classification_metrics` reports it (`group_top1_error_<g>`).

    Args:
        runs: list of run dicts (see the module docstring).
        path: str or os.PathLike. Where the PNG goes.
        groups: int sequence `[C]`. The group of each fine label (`DataSource.groups`).
        group_names: sequence of str or None. The name of each group; indices if None/empty.

    Returns:
        dict mapping each run's label to a dict of `confusion` (float array `[G, G]`, the
        matrix drawn), `top1_error` (float array `[G]`, fractions; NaN for a group without
        examples, drawn as an empty bar marked "n/a", its matrix row as dashes),
        `hierarchical_accuracy` (float) and `count` (int array `[G]`, the examples of each
        true group).
    """
    runs = _check_runs(runs)
    groups = np.asarray(groups, np.int64)
    num_groups = int(groups.max()) + 1 if groups.size else 0
    names = [str(g) for g in range(num_groups)]
    if group_names is not None and len(group_names):
        if len(group_names) < num_groups:
            raise ValueError(f"group_names has {len(group_names)} entries for {num_groups} groups.")
        names = [str(name) for name in group_names[:num_groups]]
    results = {}
    for run in runs:
        # Raises ValueError for groups of the wrong shape or with negative entries.
        confusion = metrics.hierarchical_confusion(run["logits"], run["labels"], groups, num_groups)
        true_groups = groups[run["labels"]]
        count = np.bincount(true_groups, minlength=num_groups)
        error = np.full(num_groups, np.nan)
        for g in np.flatnonzero(count):
            members = true_groups == g
            error[g] = metrics.top_k_error(run["logits"][members], run["labels"][members], 1)
        results[run["label"]] = {
            "confusion": confusion,
            "top1_error": error,
            "hierarchical_accuracy": metrics.hierarchical_accuracy(
                run["logits"], run["labels"], groups
            ),
            "count": count,
        }

    size = max(3.2, 0.9 * num_groups + 1.0)  # Room for a number in every cell.
    fig = Figure(figsize=(size * len(runs) + size + 1.6, size + 0.9), layout="constrained")
    axes = np.atleast_1d(
        fig.subplots(1, len(runs) + 1, width_ratios=[1.0] * len(runs) + [1.3])
    )
    count = results[runs[0]["label"]]["count"]
    row_names = [f"{name}\n(n={n})" for name, n in zip(names, count)]
    for i, (ax, run) in enumerate(zip(axes, runs)):
        result = results[run["label"]]
        matrix = result["confusion"]
        ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
        for r in range(num_groups):
            for c in range(num_groups):
                if count[r] == 0:
                    text, colour = "—", "0.5"
                else:
                    text = f"{100 * matrix[r, c]:.1f}"
                    colour = "white" if matrix[r, c] > 0.6 else "black"
                ax.text(c, r, text, ha="center", va="center", color=colour, fontsize=11)
        ax.set_xticks(np.arange(num_groups), names)
        ax.set_yticks(np.arange(num_groups), row_names if i == 0 else names)
        ax.set_xlabel("Predicted group")
        if i == 0:
            ax.set_ylabel("True group")
        ax.set_title(
            f"{_panel_letter(i)} {run['label']}\n"
            f"hierarchical accuracy {100 * result['hierarchical_accuracy']:.2f}%"
        )
    bars = axes[-1]
    width = 0.8 / len(runs)
    x = np.arange(num_groups)
    top = 0.0
    for r, run in enumerate(runs):
        error = results[run["label"]]["top1_error"]
        heights = 100 * np.nan_to_num(error, nan=0.0)
        container = bars.bar(
            x + (r - (len(runs) - 1) / 2) * width,
            heights,
            width=width,
            color=_run_colour(r),
            label=run["label"],
        )
        bars.bar_label(
            container,
            labels=[f"{100 * e:.1f}" if np.isfinite(e) else "n/a" for e in error],
            padding=2,
            fontsize=9,
        )
        top = max(top, float(heights.max(initial=0.0)))
    bars.set_xticks(x, names)
    bars.set_xlim(-0.6, num_groups - 0.4)
    # Head room for the numbers on the bars, and the legend above the tallest.
    bars.set_ylim(0.0, max(1.0, top) * 1.3)
    bars.set_xlabel("True group")
    bars.set_ylabel("Fine-label top-1 error (%)")
    bars.set_title(f"{_panel_letter(len(runs))} Top-1 error within each group")
    bars.legend(loc="upper center", ncols=min(len(runs), 3), framealpha=0.9)
    bars.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "Hierarchical classification: where each true group's examples are predicted "
        "(% of the row)"
    )
    _save(fig, path)
    return results


# ----------------------------------------------------------------------------------------------
# Learning curves from history.csv.
# ----------------------------------------------------------------------------------------------

# Column prefix, name in the legend, line style, marker (None: only with few epochs).
_SPLITS = (
    ("", "train", "-", None),
    ("val_", "validation", "--", "o"),
    ("test_", "test", "-.", "s"),
)


def read_history(path):
    """Reads the per-epoch logs `history.csv` of a run folder (`cskd_tf.train` writes it).

    Args:
        path: str or os.PathLike. The CSV file: a header row, then one row per epoch.

    Returns:
        dict mapping each column (`epoch`, `loss`, `ce_loss`, `accuracy`, `val_ece`, ...) to a
        float array, NaN where the file says `NA` (an epoch the `EvaluationCallback` skipped)
        or holds no number. An empty file (a run stopped before its first epoch ended) gives
        an empty dict.

    Raises:
        ValueError: the first row is empty, or a row has more or fewer cells than it.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    if not rows[0]:
        raise ValueError(f"{os.fspath(path)} has no header row.")
    header, body = rows[0], [row for row in rows[1:] if row]
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(
                f"{os.fspath(path)}: row {i + 2} has {len(row)} cells for {len(header)} columns."
            )

    def number(cell):
        try:
            return float(cell)
        except ValueError:
            return np.nan

    return {
        name: np.array([number(row[j]) for row in body], np.float64)
        for j, name in enumerate(header)
    }


def _check_histories(histories):
    if isinstance(histories, dict) or not isinstance(histories, (list, tuple)) or not histories:
        raise ValueError("histories must be a non-empty list of dicts with label and history.")
    checked = []
    for i, entry in enumerate(histories):
        missing = [key for key in ("label", "history") if key not in entry]
        if missing:
            raise ValueError(f"History {i} lacks the key(s) {', '.join(missing)}.")
        label = str(entry["label"])
        columns = {k: np.asarray(v, np.float64).ravel() for k, v in entry["history"].items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1 or not lengths.pop():
            raise ValueError(f"History '{label}' needs columns of one, non-zero length.")
        checked.append({"label": label, "history": columns})
    names = [entry["label"] for entry in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"History labels must be unique; got {names}.")
    return checked


def _loss_names(histories):
    """Training-loss columns of all runs: `loss`, `ce_loss`, then the other `*_loss`, sorted."""
    names = set()
    for entry in histories:
        for column in entry["history"]:
            if column.startswith(("val_", "test_")):
                continue
            if column == "loss" or column.endswith("_loss"):
                names.add(column)
    return sorted(names, key=lambda name: (name != "loss", name != "ce_loss", name))


def plot_learning_curves(histories, path):
    """Per-epoch training curves of one or more runs, overlaid: loss parts, top-1 error, ECE.

    One panel per loss column found in any run (`loss`, the total, then each part the method
    logs: `ce_loss`, then the others sorted, `cls_loss`, ...; a `val_`/`test_` copy, if
    logged, in the same panel), then the top-1 error in percent (training:
    `100 * (1 - accuracy)`, the running mean over the epoch, solid; held out:
    `100 * val_top1_error` dashed, or `100 * test_top1_error` dash-dotted, as the run logged
    it), then the ECE in percent (`val_ece` / `test_ece`, the paper's 20 bins). Epochs are
    numbered from 1 (the CSV's 0-based `epoch` + 1, or the row number without that column); a
    series is drawn at the epochs that have a value (with `--eval_every` > 1 the others are
    `NA`), joined by lines, with markers. One colour per run; a panel whose values are all
    non-negative starts at 0.

    Args:
        histories: list of dicts `{"label": str, "history": {column: sequence}}`, e.g. with
            `read_history(RUN/history.csv)` or a Keras `History.history`. Labels unique.
        path: str or os.PathLike. Where the PNG goes.

    Returns:
        dict mapping each run's label to `{series: {"epoch": array, "value": array}}`, the
        points drawn: series are the loss columns (as logged), `train_top1_error`, and
        `<prefix>top1_error` / `<prefix>ece` (prefix `val_` or `test_`), in percent.
    """
    histories = _check_histories(histories)
    losses = _loss_names(histories)
    panels = [(name, "loss (total)" if name == "loss" else name, "Loss") for name in losses]
    panels += [("top1_error", "Top-1 error", "Top-1 error (%)"), ("ece", "ECE", "ECE (%)")]
    results = {entry["label"]: {} for entry in histories}
    drawn = {panel: [] for panel, _, _ in panels}  # (run index, series, split)
    for r, entry in enumerate(histories):
        history = entry["history"]
        n = len(next(iter(history.values())))
        epochs = history["epoch"] + 1 if "epoch" in history else np.arange(1.0, n + 1)

        def add(panel, series, values, split, r=r, epochs=epochs, label=entry["label"]):
            finite = np.isfinite(values)
            if finite.any():
                results[label][series] = {"epoch": epochs[finite], "value": values[finite]}
                drawn[panel].append((r, series, split))

        for name in losses:
            for prefix, split, _, _ in _SPLITS:
                if prefix + name in history:
                    add(name, prefix + name, history[prefix + name], split)
        if "accuracy" in history:
            add("top1_error", "train_top1_error", 100.0 * (1.0 - history["accuracy"]), "train")
        for prefix, split, _, _ in _SPLITS[1:]:
            for panel in ("top1_error", "ece"):
                if prefix + panel in history:
                    add(panel, prefix + panel, 100.0 * history[prefix + panel], split)
    panels = [panel for panel in panels if drawn[panel[0]]]
    if not panels:
        raise ValueError("No history holds a loss, accuracy, top-1 error or ECE column to plot.")

    # Rows of at most 3 panels, or 4 from 7 panels on (7 and 8 fit two rows).
    nrows = -(-len(panels) // (4 if len(panels) > 6 else 3))
    ncols = -(-len(panels) // nrows)
    fig = Figure(figsize=(4.4 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    styles = {split: (line, marker) for _, split, line, marker in _SPLITS}
    splits_shown = set()
    for ax, (panel, title, ylabel) in zip(axes, panels):
        for r, series, split in drawn[panel]:
            label = histories[r]["label"]
            points = results[label][series]
            line, marker = styles[split]
            if marker is None and len(points["epoch"]) <= 30:  # Few epochs: show each one.
                marker = "."
            ax.plot(
                points["epoch"],
                points["value"],
                linestyle=line,
                marker=marker,
                markersize=4,
                color=_run_colour(r),
                label=f"{label} ({split})",
                gid=f"{label}|{series}",
            )
            splits_shown.add(split)
        ax.set_title(title)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(ylabel)
        if all(results[histories[r]["label"]][s]["value"].min() >= 0 for r, s, _ in drawn[panel]):
            ax.set_ylim(bottom=0.0)  # Errors, ECE and most losses: compare heights from 0.
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=_run_colour(r), linewidth=2.5, label=entry["label"])
        for r, entry in enumerate(histories)
    ]
    handles += [
        Line2D([], [], color="0.3", linestyle=line, marker=marker, markersize=4, label=split)
        for _, split, line, marker in _SPLITS
        if split in splits_shown
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
    runs = "one run" if len(histories) == 1 else f"{len(histories)} runs"
    fig.suptitle(f"Learning curves ({runs})")
    _save(fig, path)
    return results


# ----------------------------------------------------------------------------------------------
# All of them.
# ----------------------------------------------------------------------------------------------


def write_all(
    runs,
    out_dir,
    class_names=None,
    num_bins=20,
    seed=0,
    groups=None,
    group_names=None,
    histories=None,
):
    """Writes the figures into `out_dir` (created if needed).

    The four prediction figures always; Figure 4 with `groups` (a data set with a label
    hierarchy, the mixed set), the learning curves with `histories`.

    Args:
        runs: list of run dicts, with `features` (see the module docstring).
        out_dir: str or os.PathLike.
        class_names: list of str or None. Class ids if None.
        num_bins: int. Reliability diagram bins.
        seed: int. Seeds t-SNE and the choice of examples.
        groups: int sequence `[C]` or None. The group of each fine label; None or empty: no
            `hierarchical_confusion.png`.
        group_names: sequence of str or None. The groups' names.
        histories: list of `{"label", "history"}` dicts or None (see `plot_learning_curves`);
            None or empty: no `learning_curves.png`.

    Returns:
        dict mapping `reliability`, `log_prob_histograms`, `tsne` and
        `predictive_distributions`, then `hierarchical_confusion` and `learning_curves` when
        drawn, to the PNG paths.
    """
    # Checked once up front, so a bad input fails before any file is written.
    checked = _check_runs(runs, need_features=True)
    _refuse_label_indices(checked)
    hierarchical = groups is not None and len(groups) > 0
    if hierarchical:
        metrics.hierarchical_confusion(checked[0]["logits"], checked[0]["labels"], groups)
    if histories:
        _check_histories(histories)
    os.makedirs(out_dir, exist_ok=True)
    names = ["reliability", "log_prob_histograms", "tsne", "predictive_distributions"]
    names += ["hierarchical_confusion"] * hierarchical + ["learning_curves"] * bool(histories)
    paths = {name: os.path.join(out_dir, f"{name}.png") for name in names}
    plot_reliability(runs, paths["reliability"], num_bins=num_bins)
    plot_log_prob_histograms(runs, paths["log_prob_histograms"])
    plot_tsne(runs, paths["tsne"], seed=seed, class_names=class_names)
    plot_predictive_distributions(
        runs, paths["predictive_distributions"], class_names=class_names, seed=seed
    )
    if hierarchical:
        plot_hierarchical_confusion(runs, paths["hierarchical_confusion"], groups, group_names)
    if histories:
        plot_learning_curves(histories, paths["learning_curves"])
    return paths
