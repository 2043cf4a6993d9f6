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
usable; the next start removes what the killed save left behind. A write that
fails (no space, permissions, an I/O error) raises `WriteError`, naming the
file, and leaves the previous checkpoint as it was.

`StopRequest` turns SIGTERM, SIGINT and SIGUSR1 into a stop after the current
training step: `RunCheckpoint` then saves the state mid-epoch, as a periodic
save does, and stops training.
"""

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import tempfile
import threading

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
# training step of the run; `SIGTERM:K`, `SIGINT:K` or `SIGUSR1:K` sends the process that signal
# as its K-th step begins (so it arrives during that step), `SIGINTx2:K` two SIGINTs (a second
# Ctrl-C). tests/test_resume.py and tests/test_signals.py interrupt runs at chosen points with it.
CRASH_ENV = "CSKD_TF_CRASH_AT"
_MODEL_SAVES = [0]


def _crash_point():
    kind, _, count = os.environ.get(CRASH_ENV, "").partition(":")
    return (kind, int(count)) if count.isdigit() else (None, None)


def _crash_if(kind, count):
    if _crash_point() == (kind, count):
        os.kill(os.getpid(), signal.SIGKILL)


def _signal_if(count):
    kind, at = _crash_point()
    if at != count or kind is None or not kind.startswith("SIG"):
        return
    name, _, times = kind.partition("x")
    for _ in range(int(times or 1)):
        os.kill(os.getpid(), getattr(signal, name))


class WriteError(OSError):
    """A file of the run could not be written: no space, no permission, an I/O error.

    Attributes:
      path: str. The file that was being written (its final name).
      reason: str. The operating system's reason, e.g. `No space left on device`.
    """

    def __init__(self, path, error):
        reason = error.strerror or str(error)
        super().__init__(error.errno, reason, path)
        self.path, self.reason = path, reason


@contextlib.contextmanager
def _writing(path):
    """Raises `WriteError` for an `OSError` of the writes inside, naming `path` (or the path
    the yielded list holds last)."""
    where = [path]
    try:
        yield where
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(where[-1], err) from err


def _weights_bytes(model):
    """The bytes of `model.save_weights(...)`'s `.weights.h5` file, made in memory.

    HDF5 writing straight to a full disk fails messily (errors printed from destructors, and
    a crash at exit), so the file is made in memory and then written as plain bytes, whose
    failure is an ordinary `OSError`. None if this Keras lacks the in-memory store.
    """
    try:
        from keras.src.saving import saving_lib  # pylint: disable=g-import-not-at-top

        store_type = saving_lib.H5IOStore
        save_state = saving_lib._save_state  # pylint: disable=protected-access
    except (ImportError, AttributeError):
        return None
    # What `keras.Model.save_weights` does, into a buffer (`H5IOStore` takes one).
    buffer = io.BytesIO()
    store = store_type(buffer, mode="w")
    save_state(
        model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set()
    )
    store.close()
    return buffer.getvalue()


def _write_weights(model, path):
    data = _weights_bytes(model)
    if data is None:
        model.save_weights(path)
        return
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    """Writes `text` to `path` through a temporary file and an atomic rename.

    Raises:
      WriteError: if the file cannot be written; `path` is then as it was.
    """
    folder = os.path.dirname(path) or "."
    with _writing(path):
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
    """`model.save(path)` (a `.keras` file) through a temporary file and an atomic rename.

    Raises:
      WriteError: if the file cannot be written; `path` is then as it was.
    """
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    _MODEL_SAVES[0] += 1
    with _writing(path):
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
        """Writes the model's and optimizer's variables with `state`, then points `latest` there.

        Raises:
          WriteError: if a file cannot be written; the previous checkpoint is then intact.
        """
        self.saves += 1
        name = f"ckpt-{state['global_step']:09d}"
        final = os.path.join(self.directory, name)
        # A failure names the file being written, under its final name.
        with _writing(os.path.join(final, WEIGHTS_FILE)) as where:
            os.makedirs(self.directory, exist_ok=True)
            staging = tempfile.mkdtemp(dir=self.directory, prefix=".staging-")
            try:
                _write_weights(model, os.path.join(staging, WEIGHTS_FILE))
                _crash_if("save", self.saves)  # Testing: a kill in the middle of a save.
                where.append(os.path.join(final, STATE_FILE))
                with open(os.path.join(staging, STATE_FILE), "w") as f:
                    json.dump(state, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
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


# The signals that stop a run after its current step, in the order a multi-worker job reports them.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class StopRequest:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a request to stop after the current step.

    Within `installed()`, the first of these signals is recorded in `received`
    (its name) and nothing else happens: the training step in progress goes on,
    and `RunCheckpoint` saves and stops after it. A SIGINT after that (a second
    Ctrl-C) raises `KeyboardInterrupt` at once. The first Ctrl-C says so on
    stderr, as it gives no other sign on a terminal. The previous handlers are
    restored on leaving.

    On several workers only one may be signalled: `fit_multi_worker` then sets
    `collective` and, after every step, `agreed` to the first signal any worker
    received (all-reduced), so that every worker stops after the same step.
    `due()` is what the run acts on.
    """

    signals = STOP_SIGNALS

    def __init__(self):
        self.received = None
        self.collective = False
        self.agreed = None

    def due(self):
        """The name of the signal the run is to stop for, or None."""
        return self.agreed if self.collective else self.received

    def elsewhere(self):
        """Whether the signal acted on went to another worker, not this one."""
        return self.due() is not None and self.received is None

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            if name == "SIGINT":
                # os.write, not print: a handler may interrupt a print to the same stream.
                os.write(2, b"\nCtrl-C: stopping after this step and saving; "
                            b"press Ctrl-C again to stop at once, unsaved.\n")  # fmt: skip
        elif name == "SIGINT":
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """Handles the stop signals inside the block (only in the main thread, where Python
        delivers signals); restores the previous handlers after it."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        try:
            for name in self.signals:
                number = getattr(signal, name, None)  # SIGUSR1 is POSIX only.
                if number is not None:
                    previous[number] = signal.signal(number, self._handle)
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


class RunCheckpoint(keras.callbacks.Callback):
    """Saves everything a run needs to resume: every `every_steps` steps and after every epoch.

    After each epoch it also writes `last.keras`, `best.keras` when `monitor`
    improved, and the run's `history.csv` (next to `directory`); all writes are
    atomic (see the module docstring). A loss that is NaN or infinite, or a
    weight that is at a save, stops training at once, before anything is saved,
    and `diverged_at` records the global step: the checkpoints on disk stay the
    last good ones. Put it after the callbacks that add metrics to the epoch
    logs (the `EvaluationCallback`), so `monitor` and the history see them.

    Given a `StopRequest`, it stops training after the step in which a stop signal
    arrived: mid-epoch it saves the resume state there (as a periodic save
    would, so a rerun continues from that step), at an epoch's last step it
    completes the epoch's saves first; `stopped` then records where.

    Args:
      directory: str. The run's `checkpoints/` folder.
      steps_per_epoch: int. Batches in one epoch.
      every_steps: int. Save the resume state every this many steps (0: only at epoch ends).
      state: dict or None. The state this run resumed from (None: a new run).
      monitor: str or None. Epoch-log key whose minimum selects `best.keras`.
      info: dict. Saved with every state (e.g. the number of classes, checked on resume).
      save: bool. False on the workers of a multi-worker run that are not the
        chief: they track the steps and the history but write nothing.
      stop: StopRequest or None. Stop (and save) when it is due.

    Attributes:
      diverged_at: int or None. The global step at which the loss or a weight
        stopped being finite.
      stopped: dict or None. Where a stop signal stopped training: `signal`
        (its name), `epoch` (0-based), `step` (steps done in that epoch),
        `global_step` and `elsewhere` (the signal went to another worker).
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
        stop=None,
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
        self.stop = stop
        self.stopped = None

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

    def on_train_batch_begin(self, batch, logs=None):
        _signal_if(self.global_step + 1)  # Testing: a signal during this step.

    def _stop_for(self):
        return self.stop.due() if self.stop is not None else None

    def _record_stop(self, name, epoch, step):
        self.stopped = dict(
            signal=name,
            epoch=epoch,
            step=step,
            global_step=self.global_step,
            elsewhere=self.stop.elsewhere(),
        )
        self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        if not _finite((logs or {}).get("loss", 0.0)):
            self.diverged_at = self.global_step + 1
            self.model.stop_training = True
            return
        self.global_step += 1
        _crash_if("step", self.global_step)  # Testing: a kill between two steps.
        in_epoch = self.global_step - self.epoch * self.steps_per_epoch
        mid_epoch = in_epoch < self.steps_per_epoch  # Epoch ends save (and stop) on their own.
        stop = self._stop_for() if mid_epoch else None
        due = self.every_steps and self.global_step % self.every_steps == 0
        if self.save and (due or stop) and mid_epoch:
            if not _all_finite(self.model):  # This step's update overflowed: not a good state.
                self.diverged_at = self.global_step
                self.model.stop_training = True
                return
            self.store.save(self.model, self.state(self.epoch, in_epoch))
        if stop:
            self._record_stop(stop, self.epoch, in_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.stopped is not None:  # Stopped mid-epoch, and saved there: not an epoch's end.
            return
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
        if self.save:
            atomic_save_model(self.model, os.path.join(self.directory, "last.keras"))
            if improved:
                atomic_save_model(self.model, os.path.join(self.directory, "best.keras"))
            self.store.save(self.model, self.state(epoch + 1, 0))
            history = os.path.join(os.path.dirname(self.directory), "history.csv")
            write_history(history, self.history)
        stop = self._stop_for()
        if stop:  # A signal in the epoch's last step or its evaluation: stop after its saves.
            self._record_stop(stop, epoch, self.steps_per_epoch)
