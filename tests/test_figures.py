import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image
from scipy import special
from sklearn import manifold
from sklearn import metrics as sk_metrics
from threadpoolctl import threadpool_limits

from cskd_tf import figures, metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_openmp_thread():
    # t-SNE on a hundred points is over before OpenMP threads pay off; on a busy CI runner they
    # only wait for each other (measured: these tests take 2-3x longer with two threads).
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def make_runs(n=100, c=6, d=8, seed=0, labels=("CE", "CS-KD")):
    """Runs on one shared random evaluation set: noisy logits and class-clustered features."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    runs = []
    for i, label in enumerate(labels):
        logits = 2.0 * np.eye(c)[y] + rng.normal(scale=1.5 + i, size=(n, c))
        features = 3.0 * np.eye(c, d)[y] + rng.normal(size=(n, d))
        runs.append({"label": label, "logits": logits, "labels": y, "features": features})
    return runs


def one_hot_run(label, predictions, y, c):
    """A run whose argmax is `predictions`."""
    logits = 5.0 * np.eye(c)[np.asarray(predictions)]
    return {"label": label, "logits": logits, "labels": np.asarray(y), "features": logits}


def numpy_log_softmax(logits):
    """Independent computation: log(exp(z) / sum exp(z)), with the max subtracted first."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def assert_png(path, min_width=300):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert image.imread(path).shape[1] >= min_width


# Reliability diagram.


def test_reliability_bins_by_hand():
    # Ten predictions at confidence 3/4, eight right; four at 1/2, two right. Both values are
    # exact in binary and lie on bin edges, so this also pins the right-closed convention:
    # with 20 bins, 0.75 belongs to bin 14 = (0.70, 0.75] and 0.5 to bin 9 = (0.45, 0.50].
    probs = np.array([[0.75, 0.25, 0.0]] * 10 + [[0.5, 0.25, 0.25]] * 4)
    labels = np.array([0] * 8 + [1] * 2 + [0, 0, 1, 2])
    got = figures.reliability_bins(probs, labels, num_bins=20)
    expected_count = np.zeros(20, int)
    expected_count[[9, 14]] = [4, 10]
    np.testing.assert_array_equal(got["count"], expected_count)
    np.testing.assert_allclose(got["accuracy"][[9, 14]], [0.5, 0.8])
    np.testing.assert_allclose(got["confidence"][[9, 14]], [0.5, 0.75])
    empty = expected_count == 0
    assert np.all(np.isnan(got["accuracy"][empty])) and np.all(np.isnan(got["confidence"][empty]))
    np.testing.assert_allclose(got["edges"], np.arange(21) / 20)
    # ECE = 10/14 * |0.8 - 0.75| + 4/14 * |0.5 - 0.5|.
    assert metrics.expected_calibration_error(probs, labels, 20) == pytest.approx(0.5 / 14)


def test_reliability_bins_puts_zero_confidence_in_bin_zero():
    got = figures.reliability_bins(np.zeros((1, 3)), np.array([0]), num_bins=4)
    np.testing.assert_array_equal(got["count"], [1, 0, 0, 0])


@pytest.mark.parametrize("num_bins", [15, 20])
def test_reliability_bins_sum_to_the_ece(num_bins):
    rng = np.random.default_rng(num_bins)
    probs = special.softmax(rng.normal(scale=2.0, size=(500, 7)), axis=-1)
    labels = rng.integers(0, 7, size=500)
    got = figures.reliability_bins(probs, labels, num_bins)
    filled = got["count"] > 0
    ece = np.sum(
        got["count"][filled] / 500 * np.abs(got["accuracy"][filled] - got["confidence"][filled])
    )
    assert got["count"].sum() == 500
    assert ece == pytest.approx(
        metrics.expected_calibration_error(probs, labels, num_bins), abs=1e-9
    )


@pytest.mark.parametrize("num_runs", [1, 2])
def test_plot_reliability_returns_the_bins_of_each_run(tmp_path, num_runs):
    runs = make_runs()[:num_runs]
    got = figures.plot_reliability(runs, tmp_path / "r.png", num_bins=15)
    assert list(got) == [run["label"] for run in runs]
    for run in runs:
        expected = figures.reliability_bins(
            special.softmax(run["logits"], axis=-1), run["labels"], 15
        )
        for key in ("accuracy", "confidence", "count", "edges"):
            np.testing.assert_array_equal(got[run["label"]][key], expected[key])
    assert_png(tmp_path / "r.png")


# Log-probability histograms.


def test_misclassified_together_by_hand():
    y = [0, 1, 2, 0, 1]
    first = one_hot_run("A", [0, 2, 1, 1, 1], y, 3)  # Wrong on 1, 2, 3.
    second = one_hot_run("B", [1, 2, 2, 1, 0], y, 3)  # Wrong on 0, 1, 3, 4.
    np.testing.assert_array_equal(figures.misclassified_together([first, second]), [1, 3])
    np.testing.assert_array_equal(figures.misclassified_together([first]), [1, 2, 3])


def test_log_prob_histograms_plot_the_log_softmax_of_common_errors(tmp_path):
    runs = make_runs(n=200)
    y = runs[0]["labels"]
    common = np.flatnonzero((runs[0]["logits"].argmax(1) != y) & (runs[1]["logits"].argmax(1) != y))
    assert 0 < len(common) < 200
    got = figures.plot_log_prob_histograms(runs, tmp_path / "h.png")
    for run in runs:
        log_probs = numpy_log_softmax(run["logits"])[common]
        np.testing.assert_allclose(
            got[run["label"]]["predicted"], log_probs.max(axis=1), atol=1e-12
        )
        np.testing.assert_allclose(
            got[run["label"]]["true"], log_probs[np.arange(len(common)), y[common]], atol=1e-12
        )
        # On a misclassified example the true class has less probability than the predicted one.
        assert np.all(got[run["label"]]["true"] < got[run["label"]]["predicted"])
    assert_png(tmp_path / "h.png")


def test_log_prob_histograms_fall_back_to_each_runs_own_errors(tmp_path):
    y = [0, 1, 2, 0]
    first = one_hot_run("A", [0, 2, 2, 0], y, 3)  # Wrong on 1 only.
    second = one_hot_run("B", [1, 1, 2, 0], y, 3)  # Wrong on 0 only.
    got = figures.plot_log_prob_histograms([first, second], tmp_path / "h.png")
    # Logits 5 * one-hot over three classes: log P(predicted) = -log(1 + 2 e^-5),
    # log P(true) = -5 - log(1 + 2 e^-5).
    top = -np.log(1 + 2 * np.exp(-5.0))
    for label in ("A", "B"):
        np.testing.assert_allclose(got[label]["predicted"], [top])
        np.testing.assert_allclose(got[label]["true"], [top - 5.0])
    assert_png(tmp_path / "h.png")


def test_log_prob_histograms_without_any_error(tmp_path):
    y = [0, 1, 2]
    runs = [one_hot_run("A", y, y, 3), one_hot_run("B", y, y, 3)]
    got = figures.plot_log_prob_histograms(runs, tmp_path / "h.png")
    assert all(v["predicted"].size == 0 and v["true"].size == 0 for v in got.values())
    assert_png(tmp_path / "h.png")


# t-SNE.


def test_tsne_embeds_the_same_chosen_examples_for_every_run(tmp_path):
    runs = make_runs(n=120, c=8)
    y = runs[0]["labels"]
    got = figures.plot_tsne(runs, tmp_path / "t.png", max_classes=5, seed=3)
    # Enough room: every example of classes 0..4, in order.
    np.testing.assert_array_equal(got["indices"], np.flatnonzero(y < 5))
    for run in runs:
        assert got[run["label"]].shape == (len(got["indices"]), 2)
    # The same embedding as scikit-learn's t-SNE called directly with the documented settings.
    n = len(got["indices"])
    direct = manifold.TSNE(
        n_components=2, perplexity=min(30, (n - 1) / 3), init="pca", random_state=3
    ).fit_transform(runs[1]["features"][got["indices"]])
    np.testing.assert_allclose(got["CS-KD"], direct, rtol=1e-6, atol=1e-6)
    assert_png(tmp_path / "t.png")


def test_tsne_subsamples_deterministically(tmp_path):
    runs = make_runs(n=120, c=8)[:1]
    y = runs[0]["labels"]
    got = figures.plot_tsne(runs, tmp_path / "t.png", max_classes=3, max_points=20, seed=1)
    index = got["indices"]
    assert len(index) == 20 and len(np.unique(index)) == 20
    assert np.all(np.diff(index) > 0) and np.all(y[index] < 3)
    assert got["CE"].shape == (20, 2)
    again = figures.plot_tsne(runs, tmp_path / "t2.png", max_classes=3, max_points=20, seed=1)
    np.testing.assert_array_equal(again["indices"], index)
    np.testing.assert_array_equal(again["CE"], got["CE"])


# Predictive distributions.


def test_predictive_distributions_by_hand(tmp_path):
    # One example, true class 4, which has the least probability: with top=2 the plot shows
    # the most probable class (0) and the true class.
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    run = {"label": "CE", "logits": logits, "labels": np.array([4])}
    got = figures.plot_predictive_distributions([run], tmp_path / "p.png", top=2)
    np.testing.assert_array_equal(got["indices"], [0])
    np.testing.assert_array_equal(got["classes"][0], [0, 4])
    assert_png(tmp_path / "p.png")


def test_predictive_distributions_show_the_top_classes_and_the_true_one(tmp_path):
    runs = make_runs(n=200, c=12)
    y = runs[0]["labels"]
    top = 5
    got = figures.plot_predictive_distributions(
        runs, tmp_path / "p.png", num_samples=3, top=top, seed=2
    )
    common = figures.misclassified_together(runs)
    assert len(got["indices"]) == 3 and set(got["indices"]) <= set(common)
    for i, classes in zip(got["indices"], got["classes"]):
        assert y[i] in classes and len(classes) == top
        peak = np.max([special.softmax(run["logits"][i]) for run in runs], axis=0)
        # Independent computation: the top - 1 most probable classes (ties cannot occur with
        # continuous random logits), and the top one too unless the true class is among them.
        ranked = np.argsort(-peak)
        expected = set(ranked[:top]) if y[i] in ranked[:top] else set(ranked[: top - 1]) | {y[i]}
        assert set(classes) == expected
        assert np.all(np.diff(peak[classes]) <= 0)  # Left to right by decreasing probability.
    assert_png(tmp_path / "p.png")


def test_predictive_distributions_with_few_classes_and_few_errors(tmp_path):
    # Four classes (< top) and only two examples that both runs get wrong (< num_samples).
    y = [0, 1, 2, 3, 0, 1]
    first = one_hot_run("A", [1, 1, 2, 0, 0, 2], y, 4)  # Wrong on 0, 3, 5.
    second = one_hot_run("B", [2, 1, 2, 1, 0, 1], y, 4)  # Wrong on 0, 3.
    got = figures.plot_predictive_distributions(
        [first, second], tmp_path / "p.png", num_samples=4, top=10
    )
    np.testing.assert_array_equal(got["indices"], [0, 3])
    for classes in got["classes"]:
        np.testing.assert_array_equal(np.sort(classes), np.arange(4))
    assert_png(tmp_path / "p.png")


# Figure 4: hierarchical confusion.

GROUPS = np.array([0, 0, 1, 1, 1, 2])  # Six fine labels in three groups.


@pytest.fixture(name="drawn")
def _drawn(monkeypatch):
    """The matplotlib figures that `figures` saves, in order (the PNGs hold only pixels)."""
    saved = []
    save = figures._save

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return saved


def test_hierarchical_confusion_by_hand(tmp_path, drawn):
    # Labels 0, 1 (group 0), 2, 3, 4 (group 1), and none of group 2. Predictions: right, wrong
    # inside group 0, right, wrong into group 0, wrong inside group 1.
    run = one_hot_run("CE", [0, 0, 2, 1, 3], [0, 1, 2, 3, 4], 6)
    got = figures.plot_hierarchical_confusion([run], tmp_path / "h.png", GROUPS, ("a", "b", "c"))
    np.testing.assert_allclose(
        got["CE"]["confusion"], [[1.0, 0.0, 0.0], [1 / 3, 2 / 3, 0.0], [0.0, 0.0, 0.0]]
    )
    np.testing.assert_array_equal(got["CE"]["count"], [2, 3, 0])
    np.testing.assert_allclose(got["CE"]["top1_error"][:2], [0.5, 2 / 3])
    assert np.isnan(got["CE"]["top1_error"][2])  # No examples of group c: no bar.
    assert got["CE"]["hierarchical_accuracy"] == pytest.approx(0.8)
    matrix_ax, bars_ax = drawn[-1].axes
    cells = [t.get_text() for t in matrix_ax.texts]
    assert cells == ["100.0", "0.0", "0.0", "33.3", "66.7", "0.0", "—", "—", "—"]
    assert [p.get_height() for p in bars_ax.patches] == pytest.approx([50.0, 200 / 3, 0.0])
    assert [t.get_text() for t in bars_ax.texts] == ["50.0", "66.7", "n/a"]
    assert_png(tmp_path / "h.png")


def test_hierarchical_confusion_draws_the_metrics_matrices(tmp_path, drawn):
    runs = make_runs(n=300, c=6, seed=4)
    got = figures.plot_hierarchical_confusion(runs, tmp_path / "h.png", GROUPS, ("x", "y", "z"))
    y = runs[0]["labels"]
    matrix_axes, bars_ax = drawn[-1].axes[:2], drawn[-1].axes[2]
    for r, (run, ax) in enumerate(zip(runs, matrix_axes)):
        result = got[run["label"]]
        # The matrix is metrics.hierarchical_confusion's, which equals scikit-learn's.
        predicted = run["logits"].argmax(1)
        expected = sk_metrics.confusion_matrix(
            GROUPS[y], GROUPS[predicted], labels=[0, 1, 2], normalize="true"
        )
        np.testing.assert_allclose(result["confusion"], expected, atol=1e-12)
        np.testing.assert_array_equal(
            result["confusion"], metrics.hierarchical_confusion(run["logits"], y, GROUPS)
        )
        # What is drawn: the image holds the matrix, the cells its percentages.
        np.testing.assert_array_equal(ax.images[0].get_array(), result["confusion"])
        assert [t.get_text() for t in ax.texts] == [
            f"{100 * v:.1f}" for v in result["confusion"].ravel()
        ]
        assert f"{100 * np.mean(GROUPS[y] == GROUPS[predicted]):.2f}%" in ax.get_title()
        # Fine-label error per true group: a loop over the group's examples.
        for g in range(3):
            members = [i for i in range(len(y)) if GROUPS[y[i]] == g]
            wrong = sum(predicted[i] != y[i] for i in members) / len(members)
            assert result["top1_error"][g] == pytest.approx(wrong)
        heights = [p.get_height() for p in bars_ax.containers[r]]
        assert heights == pytest.approx(100 * result["top1_error"])
    scores = metrics.classification_metrics(
        runs[1]["logits"], y, groups=GROUPS, group_names=("x", "y", "z")
    )
    for g, name in enumerate("xyz"):  # The numbers metrics.json holds for a mixed run.
        assert got["CS-KD"]["top1_error"][g] == scores[f"group_top1_error_{name}"]
        assert got["CS-KD"]["confusion"][g, g] == scores[f"group_hierarchical_accuracy_{name}"]
    assert_png(tmp_path / "h.png")


def test_hierarchical_confusion_rejects_bad_groups(tmp_path):
    runs = make_runs(n=30, c=6)
    with pytest.raises(ValueError, match="one group per class"):
        figures.plot_hierarchical_confusion(runs, tmp_path / "h.png", [0, 1, 1])
    with pytest.raises(ValueError, match="group_names has 2 entries for 3 groups"):
        figures.plot_hierarchical_confusion(runs, tmp_path / "h.png", GROUPS, ("a", "b"))
    assert not (tmp_path / "h.png").exists()


# Learning curves.

HISTORY_CSV = """epoch,accuracy,ce_loss,cls_loss,loss,val_ece,val_top1_error
0,0.5,1.5,0.25,1.75,0.2,0.4
1,0.75,0.75,0.5,1.25,NA,NA
2,0.875,0.5,0.375,0.875,0.125,0.25
"""


def test_read_history_by_hand(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(HISTORY_CSV)
    got = figures.read_history(path)
    assert list(got) == HISTORY_CSV.splitlines()[0].split(",")
    np.testing.assert_array_equal(got["epoch"], [0, 1, 2])
    np.testing.assert_array_equal(got["cls_loss"], [0.25, 0.5, 0.375])
    np.testing.assert_array_equal(got["val_ece"], [0.2, np.nan, 0.125])  # NA: not evaluated.
    (tmp_path / "empty.csv").write_text("")
    assert figures.read_history(tmp_path / "empty.csv") == {}
    (tmp_path / "bad.csv").write_text("epoch,loss\n0,1.0,2.0\n")
    with pytest.raises(ValueError, match="row 2 has 3 cells for 2 columns"):
        figures.read_history(tmp_path / "bad.csv")


def test_learning_curves_plot_the_history_columns(tmp_path, drawn):
    path = tmp_path / "history.csv"
    path.write_text(HISTORY_CSV)
    cskd = figures.read_history(path)
    # A CE run that logged the test split, as a Keras History (no epoch column).
    ce = {"loss": [1.0, 0.5, 0.25, 0.125], "accuracy": [0.5, 0.625, 0.75, 1.0]}
    ce.update(test_top1_error=[0.5, 0.375, 0.25, 0.125], test_ece=[0.0625, 0.125, 0.1875, 0.25])
    got = figures.plot_learning_curves(
        [{"label": "CS-KD", "history": cskd}, {"label": "CE", "history": ce}], tmp_path / "lc.png"
    )
    # Hand-computed from the columns: epochs from 1, errors and ECE in percent.
    expected = {
        "CS-KD": {
            "loss": ([1, 2, 3], [1.75, 1.25, 0.875]),
            "ce_loss": ([1, 2, 3], [1.5, 0.75, 0.5]),
            "cls_loss": ([1, 2, 3], [0.25, 0.5, 0.375]),
            "train_top1_error": ([1, 2, 3], [50.0, 25.0, 12.5]),
            "val_top1_error": ([1, 3], [40.0, 25.0]),  # Epoch 2 was not evaluated.
            "val_ece": ([1, 3], [20.0, 12.5]),
        },
        "CE": {
            "loss": ([1, 2, 3, 4], [1.0, 0.5, 0.25, 0.125]),
            "train_top1_error": ([1, 2, 3, 4], [50.0, 37.5, 25.0, 0.0]),
            "test_top1_error": ([1, 2, 3, 4], [50.0, 37.5, 25.0, 12.5]),
            "test_ece": ([1, 2, 3, 4], [6.25, 12.5, 18.75, 25.0]),
        },
    }
    assert {label: set(series) for label, series in got.items()} == {
        label: set(series) for label, series in expected.items()
    }
    for label, series in expected.items():
        for name, (epochs, values) in series.items():
            np.testing.assert_allclose(got[label][name]["epoch"], epochs, err_msg=name)
            np.testing.assert_allclose(got[label][name]["value"], values, err_msg=name)
    # What is drawn: one panel per loss column, then top-1 error and ECE; each line's data.
    axes = [ax for ax in drawn[-1].axes if ax.axison]
    titles = [ax.get_title() for ax in axes]
    assert titles == ["loss (total)", "ce_loss", "cls_loss", "Top-1 error", "ECE"]
    lines = {line.get_gid(): line for ax in axes for line in ax.get_lines()}
    assert set(lines) == {f"{label}|{name}" for label in expected for name in expected[label]}
    for label, series in expected.items():
        for name, (epochs, values) in series.items():
            line = lines[f"{label}|{name}"]
            np.testing.assert_allclose(line.get_xdata(), epochs)
            np.testing.assert_allclose(line.get_ydata(), values)
    panel = dict(zip(titles, axes))
    assert {line.get_gid() for line in panel["ECE"].get_lines()} == {"CS-KD|val_ece", "CE|test_ece"}
    assert {line.get_gid() for line in panel["loss (total)"].get_lines()} == {
        "CS-KD|loss",
        "CE|loss",
    }
    legend = [t.get_text() for t in drawn[-1].legends[0].get_texts()]
    assert legend == ["CS-KD", "CE", "train", "validation", "test"]
    assert_png(tmp_path / "lc.png")


def test_learning_curves_reject_bad_histories(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        figures.plot_learning_curves([], tmp_path / "lc.png")
    history = {"loss": [1.0, 0.5]}
    with pytest.raises(ValueError, match="unique"):
        figures.plot_learning_curves(
            [{"label": "A", "history": history}] * 2, tmp_path / "lc.png"
        )
    with pytest.raises(ValueError, match="one, non-zero length"):
        figures.plot_learning_curves(
            [{"label": "A", "history": {"loss": [1.0], "accuracy": [0.5, 0.6]}}],
            tmp_path / "lc.png",
        )
    with pytest.raises(ValueError, match="No history holds"):
        figures.plot_learning_curves([{"label": "A", "history": {"lr": [0.1]}}], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


# All figures, and bad input.


@pytest.mark.parametrize("num_runs", [1, 2])
def test_write_all_writes_four_pngs(tmp_path, num_runs):
    runs = make_runs(n=90)[:num_runs]
    names = ["airplane", "car", "bird", "cat", "deer", "dog"]
    paths = figures.write_all(runs, tmp_path / "figures", class_names=names, num_bins=10)
    assert set(paths) == {"reliability", "log_prob_histograms", "tsne", "predictive_distributions"}
    for name, path in paths.items():
        assert str(path).endswith(f"{name}.png")
        assert_png(path)


@pytest.mark.slow
def test_write_all_adds_figure_4_with_groups_and_learning_curves_with_histories(tmp_path):
    runs = make_runs(n=24)
    histories = [{"label": run["label"], "history": {"loss": [1.0, 0.5]}} for run in runs]
    paths = figures.write_all(
        runs, tmp_path / "f", groups=GROUPS, group_names=("a", "b", "c"), histories=histories
    )
    assert list(paths) == [
        "reliability",
        "log_prob_histograms",
        "tsne",
        "predictive_distributions",
        "hierarchical_confusion",
        "learning_curves",
    ]
    for name, path in paths.items():
        assert str(path).endswith(f"{name}.png")
        assert_png(path)
    # Bad groups fail before any file is written.
    with pytest.raises(ValueError, match="one group per class"):
        figures.write_all(runs, tmp_path / "g", groups=[0, 1])
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "draw",
    [
        lambda runs, path: figures.plot_reliability(runs, path),
        lambda runs, path: figures.misclassified_together(runs),
        lambda runs, path: figures.plot_log_prob_histograms(runs, path),
        lambda runs, path: figures.plot_tsne(runs, path),
        lambda runs, path: figures.plot_predictive_distributions(runs, path),
        lambda runs, path: figures.write_all(runs, path),
    ],
)
def test_runs_on_different_examples_are_refused(tmp_path, draw):
    runs = make_runs(n=40)
    runs[1]["labels"] = np.roll(runs[1]["labels"], 1)
    with pytest.raises(ValueError, match="same examples"):
        draw(runs, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_other_bad_runs_are_refused(tmp_path):
    runs = make_runs(n=40)
    with pytest.raises(ValueError, match="unique"):
        figures.plot_reliability([runs[0], runs[0]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="same examples"):
        figures.plot_reliability(
            [
                runs[0],
                {**runs[1], "logits": runs[1]["logits"][:30], "labels": runs[1]["labels"][:30]},
            ],
            tmp_path / "x.png",
        )
    with pytest.raises(ValueError, match="features"):
        figures.plot_tsne([{k: v for k, v in runs[0].items() if k != "features"}], tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        figures.plot_reliability(runs[0], tmp_path / "x.png")


def test_importing_figures_leaves_pyplot_unloaded():
    # pyplot would pick a display backend and keep global figure state; the module must not
    # need either, so that it runs headless.
    code = "import sys, cskd_tf.figures; sys.exit('matplotlib.pyplot' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
