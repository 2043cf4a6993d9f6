"""RunCheckpoint's choice of `best.keras`, on runs whose best epoch is known by construction.

(The atomic writes, the resume store and killed runs are in tests/test_resume.py.)
"""

import keras
import numpy as np

from cskd_tf import checkpointing

MONITOR = "val_top1_error"
STEPS = 2  # 8 examples in batches of 4.


class Scores(keras.callbacks.Callback):
    """Puts a given validation score into each epoch's logs, as the EvaluationCallback does."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def on_epoch_end(self, epoch, logs=None):
        logs[MONITOR] = self.scores[epoch]


class Snapshots(keras.callbacks.Callback):
    """The model's weights at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [w.numpy().copy() for w in self.model.weights]


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.2, momentum=0.9), "mse")
    return model


def fit(model, directory, scores, epochs, snapshots, state=None):
    """Trains epochs `epochs.start` to `epochs.stop - 1`, as train.run does after a resume."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    directory.mkdir(exist_ok=True)  # train.run makes it before training.
    run_checkpoint = checkpointing.RunCheckpoint(
        str(directory), STEPS, state=state, monitor=MONITOR
    )
    model.fit(
        x, y, batch_size=4, epochs=epochs.stop, initial_epoch=epochs.start, shuffle=False,
        verbose=0, callbacks=[Scores(scores), snapshots, run_checkpoint],
    )  # fmt: skip
    return run_checkpoint


def saved(path):
    return [np.asarray(w) for w in keras.models.load_model(path).weights]


def assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_best_keras_holds_the_epoch_of_the_lowest_score_across_a_resume(tmp_path):
    """Scores 0.5, 0.3, 0.4, 0.2, 0.2: `best.keras` is epoch 3 (the first of two equal minima),
    `last.keras` epoch 4. Resumed from the saved state, a worse epoch 5 (0.25) keeps epoch 3;
    a better epoch 6 (0.1) replaces it.

    Mutants run: (1) `value > self.best` in `RunCheckpoint.on_epoch_end` (the worst epoch
    kept): `best.keras` holds epoch 0, `assert_same(saved(best), snapshots.weights[3])`
    fails; (2) `self.best = None` in `RunCheckpoint.__init__` (the best score forgotten on
    resume, the reference's bug): the resumed epoch 5 overwrites `best.keras`, and the same
    comparison after the resume fails.
    """
    directory = tmp_path / "checkpoints"
    best, last = directory / "best.keras", directory / "last.keras"
    scores = [0.5, 0.3, 0.4, 0.2, 0.2, 0.25, 0.1]
    model, snapshots = tiny_model(), Snapshots()
    run_checkpoint = fit(model, directory, scores, range(0, 5), snapshots)
    # Every epoch moved the weights: the files tell the epochs apart.
    for epoch in range(1, 5):
        assert not np.allclose(snapshots.weights[epoch][0], snapshots.weights[epoch - 1][0])
    assert_same(saved(best), snapshots.weights[3])
    assert_same(saved(last), snapshots.weights[4])
    assert run_checkpoint.best == 0.2
    state = run_checkpoint.store.read_state()
    assert (state["best"], state["monitor"], state["epoch"], state["step"]) == (0.2, MONITOR, 5, 0)
    assert [logs[MONITOR] for logs in state["history"]] == scores[:5]

    # Resumed as train.run resumes: a new model restored from the store, the saved state.
    for epoch, best_epoch in ((5, 3), (6, 6)):
        store = checkpointing.ResumeStore(str(directory))
        model = tiny_model()
        state = store.restore(model)
        assert state["epoch"] == epoch
        assert_same([np.asarray(w) for w in model.weights], snapshots.weights[epoch - 1])
        run_checkpoint = fit(model, directory, scores, range(epoch, epoch + 1), snapshots, state)
        assert_same(saved(best), snapshots.weights[best_epoch])
        assert_same(saved(last), snapshots.weights[epoch])
        assert run_checkpoint.best == scores[best_epoch]
    # The history the state carries on has every epoch once.
    assert [logs[MONITOR] for logs in store.read_state()["history"]] == scores


def test_without_a_monitor_no_best_keras_is_written(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    model = tiny_model()
    run_checkpoint = checkpointing.RunCheckpoint(str(directory), STEPS, monitor=None)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 3)), rng.normal(size=(8, 2)), batch_size=4, epochs=2,
              verbose=0, callbacks=[Scores([0.5, 0.1]), run_checkpoint])  # fmt: skip
    assert (directory / "last.keras").exists() and not (directory / "best.keras").exists()
    assert run_checkpoint.best is None
