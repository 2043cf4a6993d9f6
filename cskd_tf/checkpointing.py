"""Checkpoints that survive a kill at any moment, and what a run needs to resume from them.

A run folder's `checkpoints/` holds

* `resume/ckpt-<step>/` : the model's and the optimizer's variables
  (`state.weights.h5`: weights, batch-norm statistics, momentum, step count,
  hence the learning-rate schedule's position) and `state.json` (epoch,
  batches done in it, global step, best-so-far metric, per-epoch history);
* `resume/latest` : the name of the newest complete `ckpt-<step>`;
* `last.keras` and `best.keras` : the model after the last epoch and at its best
  validation top-1 error, for evaluation and export;

and the run folder `history.csv`, the per-epoch logs of the epochs the newest
checkpoint holds (so a resumed run's history has each epoch exactly once).

Every file is written under a temporary name and renamed into place
(`os.replace`, atomic on POSIX), and `latest` moves only once its checkpoint
is complete. A kill during a save therefore leaves the previous checkpoint
usable; the next start removes what the killed save left behind.
"""

import csv
import io
import json
import math
import os
import shutil
import tempfile

import keras
import numpy as np

# What training computes, for the checkpoints: 2 since cskd_tf 0.2 (PyTorch's batch-norm
# moving variance, the anchors' pass first, each replica weighted by its share of the batch).
# A run started under another format cannot be continued by this code.
FORMAT = 2
RESUME_DIR = "resume"
STATE_FILE = "state.json"
WEIGHTS_FILE = "state.weights.h5"
# Testing only: `CSKD_TF_CRASH_AT=save:K` kills the process (SIGKILL) in the middle of its K-th
# resume save, `model_save:K` in the middle of its K-th `.keras` save, `step:K` after the K-th
# training step of the run. tests/test_resume.py interrupts runs at chosen points with it.
CRASH_ENV = "CSKD_TF_CRASH_AT"
_MODEL_SAVES = [0]


def _crash_point():
    kind, _, count = os.environ.get(CRASH_ENV, "").partition(":")
    return (kind, int(count)) if count.isdigit() else (None, None)


def _crash_if(kind, count):
    if _crash_point() == (kind, count):
        import signal  # pylint: disable=g-import-not-at-top

        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path, text):
    """Writes `text` to `path` through a temporary file and an atomic rename."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_save_model(model, path):
    """`model.save(path)` (a `.keras` file) through a temporary file and an atomic rename."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    _MODEL_SAVES[0] += 1
    try:
        model.save(tmp)
        _crash_if("model_save", _MODEL_SAVES[0])  # Testing: a kill in the middle of a save.
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


class ResumeStore:
    """The `resume/` folder of a run: atomic saves of the training state, and the newest one.

    Args:
      directory: str. The run's `checkpoints/` folder.
    """

    def __init__(self, directory):
        self.directory = os.path.join(directory, RESUME_DIR)
        self.saves = 0

    def _pointer(self):
        return os.path.join(self.directory, "latest")

    def latest(self):
        """The newest complete checkpoint's folder, or None."""
        try:
            with open(self._pointer()) as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        folder = os.path.join(self.directory, name)
        return folder if os.path.isfile(os.path.join(folder, STATE_FILE)) else None

    def read_state(self):
        """The newest checkpoint's `state.json` as a dict, or None."""
        folder = self.latest()
        if folder is None:
            return None
        with open(os.path.join(folder, STATE_FILE)) as f:
            return json.load(f)

    def clean(self):
        """Removes what a killed save left: staging folders, stale checkpoints, temp files."""
        checkpoints = os.path.dirname(self.directory)
        for folder in (checkpoints, os.path.dirname(checkpoints)):  # And the run folder.
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(".tmp-"):
                        os.remove(os.path.join(folder, name))
        if not os.path.isdir(self.directory):
            return
        keep = self.latest()
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name == "latest" or path == keep:
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)

    def save(self, model, state):
        """Writes the model's and optimizer's variables with `state`, then points `latest` there."""
        os.makedirs(self.directory, exist_ok=True)
        self.saves += 1
        name = f"ckpt-{state['global_step']:09d}"
        staging = tempfile.mkdtemp(dir=self.directory, prefix=".staging-")
        try:
            model.save_weights(os.path.join(staging, WEIGHTS_FILE))
            _crash_if("save", self.saves)  # Testing: a kill in the middle of a save.
            with open(os.path.join(staging, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            final = os.path.join(self.directory, name)
            if os.path.exists(final):  # The same step saved again (e.g. at an epoch's end).
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(self.directory)
        atomic_write_text(self._pointer(), name + "\n")
        self.clean()

    def restore(self, model):
        """Loads the newest checkpoint into `model` (compiled and built); returns its state."""
        folder = self.latest()
        if folder is None:
            return None
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, STATE_FILE)) as f:
            return json.load(f)


def write_history(path, history):
    """Writes per-epoch logs as CSV: `epoch`, then the keys sorted; `NA` where an epoch lacks one."""
    out = io.StringIO()
    if history:
        keys = sorted(set().union(*history))
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["epoch", *keys])
        for epoch, logs in enumerate(history):
            writer.writerow([epoch, *(logs.get(k, "NA") for k in keys)])
    atomic_write_text(path, out.getvalue())


def _finite(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def _all_finite(model):
    return all(bool(np.all(np.isfinite(np.asarray(w)))) for w in model.trainable_weights)


def _plain(logs):
    return {k: float(np.asarray(v)) for k, v in (logs or {}).items()}


class RunCheckpoint(keras.callbacks.Callback):
    """Saves everything a run needs to resume: every `every_steps` steps and after every epoch.

    After each epoch it also writes `last.keras`, `best.keras` when `monitor`
    improved, and the run's `history.csv` (next to `directory`); all writes are
    atomic (see the module docstring). A loss that is NaN or infinite, or a
    weight that is at a save, stops training at once, before anything is saved,
    and `diverged_at` records the global step: the checkpoints on disk stay the
    last good ones. Put it after the callbacks that add metrics to the epoch
    logs (the `EvaluationCallback`), so `monitor` and the history see them.

    Args:
      directory: str. The run's `checkpoints/` folder.
      steps_per_epoch: int. Batches in one epoch.
      every_steps: int. Save the resume state every this many steps (0: only at epoch ends).
      state: dict or None. The state this run resumed from (None: a new run).
      monitor: str or None. Epoch-log key whose minimum selects `best.keras`.
      info: dict. Saved with every state (e.g. the number of classes, checked on resume).
      save: bool. False on the workers of a multi-worker run that are not the
        chief: they track the steps and the history but write nothing.
    """

    def __init__(
        self,
        directory,
        steps_per_epoch,
        every_steps=0,
        state=None,
        monitor=None,
        info=None,
        save=True,
    ):
        super().__init__()
        self.info = dict(info or {})
        self.save = save
        self.directory = directory
        self.store = ResumeStore(directory)
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        state = state or {}
        self.global_step = state.get("global_step", 0)
        self.history = state.get("history", [])
        self.best = state.get("best")
        self.monitor = monitor
        self.epoch = state.get("epoch", 0)
        self.diverged_at = None

    def state(self, epoch, step):
        return {
            **self.info,
            "epoch": epoch,
            "step": step,
            "global_step": self.global_step,
            "best": self.best,
            "monitor": self.monitor,
            "history": self.history,
        }

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not _finite((logs or {}).get("loss", 0.0)):
            self.diverged_at = self.global_step + 1
            self.model.stop_training = True
            return
        self.global_step += 1
        _crash_if("step", self.global_step)  # Testing: a kill between two steps.
        in_epoch = self.global_step - self.epoch * self.steps_per_epoch
        due = self.every_steps and self.global_step % self.every_steps == 0
        if self.save and due and in_epoch < self.steps_per_epoch:  # Epoch ends save the rest.
            if not _all_finite(self.model):  # This step's update overflowed: not a good state.
                self.diverged_at = self.global_step
                self.model.stop_training = True
                return
            self.store.save(self.model, self.state(self.epoch, in_epoch))

    def on_epoch_end(self, epoch, logs=None):
        finite = all(_finite(v) for v in (logs or {}).values()) and _all_finite(self.model)
        if self.diverged_at is not None or not finite:
            self.model.stop_training = True
            if self.diverged_at is None:
                self.diverged_at = self.global_step
            return
        logs = _plain(logs)
        self.history.append(logs)
        improved = False
        value = logs.get(self.monitor) if self.monitor else None
        if value is not None and (self.best is None or value < self.best):
            self.best, improved = value, True
        if not self.save:
            return
        atomic_save_model(self.model, os.path.join(self.directory, "last.keras"))
        if improved:
            atomic_save_model(self.model, os.path.join(self.directory, "best.keras"))
        self.store.save(self.model, self.state(epoch + 1, 0))
        write_history(os.path.join(os.path.dirname(self.directory), "history.csv"), self.history)
