import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image
from scipy import special
from sklearn import manifold
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
