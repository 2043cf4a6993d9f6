"""Interrupted runs: SIGKILL at chosen points, then the same command again, to the same weights."""

import errno
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest

from cskd_tf import checkpointing
from cskd_tf import saving

REPO = pathlib.Path(__file__).resolve().parents[1]
# 1,438 training digits in batches of 64: 23 steps per epoch, 69 in all; a save every 5 steps.
FLAGS = (
    "--dataset=digits",
    "--backbone=small_convnet",
    "--epochs=3",
    "--batch_size=64",
    "--save_every_steps=5",
    "--deterministic",
)


# PS-KD and DLB keep state from step to step (the table of last-epoch predictions, the previous
# step's logits): 2 epochs of 23 steps of the MLP, a save every 5 steps.
STATEFUL_FLAGS = (
    "--dataset=digits",
    "--backbone=mlp",
    "--epochs=2",
    "--batch_size=64",
    "--save_every_steps=5",
    "--deterministic",
)


def run_cli(workdir, crash=None, flags=FLAGS):
    env = {k: v for k, v in os.environ.items() if k != checkpointing.CRASH_ENV}
    env.update(CI="true", TF_CPP_MIN_LOG_LEVEL="2")
    if crash:
        env[checkpointing.CRASH_ENV] = crash
    return subprocess.run(
        [sys.executable, "-m", "cskd_tf.train", *flags, f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,  # Headless: no terminal, stdin closed.
        capture_output=True,
        text=True,
        timeout=600,
    )


def weights(path):
    model = saving.load_model(path)
    return [np.asarray(w) for w in model.weights]


def folder_digest(folder):
    """Names and contents of every file under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    done = run_cli(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_killed_runs_resume_to_the_weights_of_an_uninterrupted_run(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    # Each kill happens in a fresh process, which resumes from the previous one's last save:
    # mid-epoch after a save (step 8, last save at step 5), during the write of a resume
    # checkpoint, during the write of last.keras at an epoch's end, and mid-epoch again.
    kills = {
        "step:8": 5,
        "save:3": 15,  # Resumed at 5, it saves at 10 and 15 and dies writing 20.
        "model_save:1": 20,  # Dies writing last.keras after epoch 1 (step 23), before its state.
        "step:40": 35,  # Dies after step 40, before saving it.
    }
    for crash, last_good in kills.items():
        done = run_cli(workdir, crash)
        assert done.returncode == -signal.SIGKILL, (crash, done.stderr[-3000:])
        state = checkpointing.ResumeStore(workdir / "checkpoints").read_state()
        assert state["global_step"] == last_good, crash
        assert not (workdir / "metrics.json").exists()
    done = run_cli(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Wrote {workdir}/metrics.json" in done.stdout

    # Bit-identical final weights (and optimizer state in the resume checkpoint).
    for a, b in zip(
        weights(uninterrupted / "checkpoints/last.keras"),
        weights(workdir / "checkpoints/last.keras"),
    ):
        np.testing.assert_array_equal(a, b)
    resume = "checkpoints/resume/ckpt-000000069/state.weights.h5"
    assert (uninterrupted / resume).read_bytes() == (workdir / resume).read_bytes()
    # The same test metrics, and a history with each epoch once.
    ours = json.loads((workdir / "metrics.json").read_text())
    reference = json.loads((uninterrupted / "metrics.json").read_text())
    for key in ("top1_error", "ece", "nll", "recall_at_1"):
        assert ours[key] == reference[key]
    rows = (workdir / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    column = rows[0].split(",").index("test_top1_error")
    reference_rows = (uninterrupted / "history.csv").read_text().splitlines()
    assert [r.split(",")[column] for r in rows] == [r.split(",")[column] for r in reference_rows]
    # Nothing the kills left behind remains.
    leftovers = [p.name for p in workdir.rglob(".*")]
    assert leftovers == []
    assert sorted(os.listdir(workdir / "checkpoints/resume")) == ["ckpt-000000069", "latest"]


@pytest.mark.slow
def test_a_finished_run_rerun_does_nothing_and_says_so(uninterrupted):
    before = folder_digest(uninterrupted)
    done = run_cli(uninterrupted)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.strip() == f"{uninterrupted} is a finished run (metrics.json): nothing to do."
    )
    assert folder_digest(uninterrupted) == before


@pytest.mark.slow
@pytest.mark.parametrize("method,state", [("ps_kd", "ps_kd_predictions"), ("dlb", "dlb_logits")])
def test_a_stateful_method_killed_mid_epoch_resumes_to_the_uninterrupted_state(
    method, state, tmp_path
):
    flags = (*STATEFUL_FLAGS, f"--method={method}")
    reference = tmp_path / "uninterrupted"
    done = run_cli(reference, flags=flags)
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = tmp_path / "killed"
    # Killed after step 8 (resumed from 5: the rest of epoch 0, then epoch 1 from a new
    # pipeline, whose first batch repeats epoch 0's last one for DLB) and after step 30
    # (resumed from 25, midway through epoch 1, whose steps read what epoch 0 and the steps
    # before left in the state).
    for crash, last_good in {"step:8": 5, "step:30": 25}.items():
        done = run_cli(workdir, crash, flags)
        assert done.returncode == -signal.SIGKILL, (crash, done.stderr[-3000:])
        assert checkpointing.ResumeStore(workdir / "checkpoints").read_state()["global_step"] == (
            last_good
        )
    done = run_cli(workdir, flags=flags)
    assert done.returncode == 0, done.stderr[-3000:]

    # Bit-identical final weights, the method's state among them, and resume checkpoint.
    ours, theirs = (saving.load_model(w / "checkpoints/last.keras") for w in (workdir, reference))
    assert [w.path for w in ours.weights] == [w.path for w in theirs.weights]
    assert any(w.path.endswith(state) and np.any(np.asarray(w)) for w in ours.weights)
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    resume = "checkpoints/resume/ckpt-000000046/state.weights.h5"
    assert (reference / resume).read_bytes() == (workdir / resume).read_bytes()
    ours, theirs = (json.loads((w / "metrics.json").read_text()) for w in (workdir, reference))
    for key in ("top1_error", "ece", "nll", "recall_at_1"):
        assert ours[key] == theirs[key]


@pytest.mark.parametrize("fails", ["weights", "state"])
def test_a_failed_save_names_the_file_and_keeps_the_previous_checkpoint(
    fails, tmp_path, monkeypatch
):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    store = checkpointing.ResumeStore(str(tmp_path))
    store.save(model, {"global_step": 1, "epoch": 0, "step": 1})
    saved = [w.numpy().copy() for w in model.weights]
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if fails == "weights":
        monkeypatch.setattr(checkpointing, "_write_weights", mock.Mock(side_effect=full))
    else:  # The weights are written, then state.json is not.
        real_open = open

        def open_(path, *args, **kwargs):
            if str(path).endswith(checkpointing.STATE_FILE) and "w" in (args or ("r",))[0]:
                raise full
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", open_)
    with pytest.raises(checkpointing.WriteError) as err:
        store.save(model, {"global_step": 2, "epoch": 0, "step": 2})
    monkeypatch.undo()
    name = checkpointing.WEIGHTS_FILE if fails == "weights" else checkpointing.STATE_FILE
    assert err.value.path == str(tmp_path / "resume" / "ckpt-000000002" / name)
    assert err.value.errno == errno.ENOSPC and err.value.reason == "No space left on device"
    assert store.read_state()["global_step"] == 1
    assert sorted(os.listdir(tmp_path / "resume")) == ["ckpt-000000001", "latest"]
    assert store.restore(model)["global_step"] == 1
    for w, expected in zip(model.weights, saved):
        np.testing.assert_array_equal(w.numpy(), expected)


def test_the_weights_made_in_memory_load_as_keras_own_file(tmp_path):
    # ResumeStore writes the bytes of the .weights.h5 file itself (a full disk then fails with
    # a plain OSError); they must load as what model.save_weights writes does.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(4)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 4)), verbose=0)  # Momentum that is not zero.
    ours, theirs = tmp_path / "ours.weights.h5", tmp_path / "theirs.weights.h5"
    assert checkpointing._weights_bytes(model) is not None
    checkpointing._write_weights(model, str(ours))
    model.save_weights(str(theirs))
    values = []
    for path in (ours, theirs):
        copy = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(4)])
        copy.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
        copy.optimizer.build(copy.trainable_variables)
        copy.load_weights(str(path))
        values.append([np.asarray(v) for v in copy.weights + copy.optimizer.variables])
    assert len(values[0]) == len(values[1]) > 6
    for a, b in zip(*values):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(values[0], [np.asarray(v) for v in model.weights + model.optimizer.variables]):
        np.testing.assert_array_equal(a, b)


def test_clean_removes_what_a_killed_save_left(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    store = checkpointing.ResumeStore(str(tmp_path / "checkpoints"))
    store.save(model, {"global_step": 7, "epoch": 0, "step": 7})
    (tmp_path / "checkpoints/resume/.staging-abc").mkdir()
    (tmp_path / "checkpoints/resume/ckpt-000000009").mkdir()  # Never pointed at.
    (tmp_path / "checkpoints/.tmp-1-last.keras").write_text("half")
    (tmp_path / ".tmp-xyzhistory.csv").write_text("half")
    store.clean()
    assert sorted(os.listdir(tmp_path / "checkpoints/resume")) == ["ckpt-000000007", "latest"]
    assert os.listdir(tmp_path / "checkpoints") == ["resume"]
    assert os.listdir(tmp_path) == ["checkpoints"]
    assert store.read_state()["global_step"] == 7


def test_history_csv_has_every_key_and_na_where_an_epoch_lacks_one(tmp_path):
    path = tmp_path / "history.csv"
    checkpointing.write_history(str(path), [{"loss": 1.5, "val_ece": 0.25}, {"loss": 0.5}])
    assert path.read_text() == "epoch,loss,val_ece\n0,1.5,0.25\n1,0.5,NA\n"
