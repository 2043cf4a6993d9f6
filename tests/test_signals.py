"""Pre-emption: SIGTERM, SIGINT and SIGUSR1 stop a run after the step in progress, which is saved,
and the same command resumes it to bit-for-bit the weights of an uninterrupted run; on two
workers a signal to one stops both after the same step; a lost worker is named in one line.

The signals are real: the test-only `CSKD_TF_CRASH_AT=SIGTERM:K` makes the process send one to
itself as its K-th step begins (so it arrives during that step), and one test sends SIGTERM from
outside at a moment it does not choose.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import checkpointing
from cskd_tf import cli
from cskd_tf import distributed
from cskd_tf import saving
from cskd_tf import train
from localhost import free_ports  # tests/localhost.py

REPO = pathlib.Path(__file__).resolve().parents[1]
# 1,438 training digits in batches of 64: 23 steps per epoch, 46 in all. No periodic saves:
# whatever a stop leaves, the stop saved.
FLAGS = (
    "--dataset=digits",
    "--backbone=mlp",
    "--epochs=2",
    "--batch_size=64",
    "--save_every_steps=0",
    "--deterministic",
)
STEPS = 23


def _env(crash=None):
    env = {k: v for k, v in os.environ.items() if k != checkpointing.CRASH_ENV}
    env.update(CI="true", TF_CPP_MIN_LOG_LEVEL="2")
    if crash:
        env[checkpointing.CRASH_ENV] = crash
    return env


def run_cli(workdir, crash=None, flags=FLAGS):
    return subprocess.run(
        [sys.executable, "-m", "cskd_tf.train", *flags, f"--workdir={workdir}"],
        cwd=REPO,
        env=_env(crash),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_line(done, status):
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def state_of(workdir):
    return checkpointing.ResumeStore(workdir / "checkpoints").read_state()


def checkpoints_of(workdir):
    return sorted(n for n in os.listdir(workdir / "checkpoints/resume") if n.startswith("ckpt-"))


def assert_same_final_state(ours, reference, last_step=2 * STEPS):
    """Bit-for-bit weights, optimizer state and test metrics of two finished run folders."""
    a, b = (saving.load_model(w / "checkpoints/last.keras") for w in (ours, reference))
    assert [w.path for w in a.weights] == [w.path for w in b.weights]
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=x.path)
    resume = f"checkpoints/resume/ckpt-{last_step:09d}/state.weights.h5"
    assert (ours / resume).read_bytes() == (reference / resume).read_bytes()
    a, b = (json.loads((w / "metrics.json").read_text()) for w in (ours, reference))
    for key in ("top1_error", "ece", "nll", "recall_at_1"):
        assert a[key] == b[key], key


def _columns(path):
    rows = [r.split(",") for r in path.read_text().splitlines()]
    return {name: [r[i] for r in rows[1:]] for i, name in enumerate(rows[0])}


def logged_epochs(workdir):
    """The epochs TensorBoard's `epoch_loss` was logged for, over every event file."""
    steps = []
    for path in sorted((workdir / "tensorboard/train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value if v.tag == "epoch_loss"]
    return sorted(steps)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("signals") / "uninterrupted"
    done = run_cli(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_signals_mid_epoch_save_that_step_and_the_reruns_end_with_the_uninterrupted_weights(
    uninterrupted, tmp_path
):
    workdir = tmp_path / "run"
    again = "saved, rerun the same command to resume."
    # SIGTERM during step 8 of a new run: step 8 is finished and saved, mid-epoch.
    done = run_cli(workdir, "SIGTERM:8")
    assert last_line(done, cli.EXIT_STOPPED) == (
        f"error: stopped by SIGTERM at step 8 of epoch 1; {again}"
    )
    state = state_of(workdir)
    assert (state["global_step"], state["epoch"], state["step"]) == (8, 0, 8)
    assert checkpoints_of(workdir) == ["ckpt-000000008"]
    assert not (workdir / "metrics.json").exists()
    assert not (workdir / "checkpoints/last.keras").exists()  # Epoch 1 never ended.

    # Ctrl-C during step 30 (7 of epoch 2) of the rerun, which says where it resumes.
    done = run_cli(workdir, "SIGINT:30")
    assert f"Resuming {workdir} at epoch 1, step 8 of {STEPS}." in done.stdout.splitlines()
    assert "Ctrl-C: stopping after this step and saving; press Ctrl-C again" in done.stderr
    assert last_line(done, cli.EXIT_STOPPED) == (
        f"error: stopped by SIGINT at step 7 of epoch 2; {again}"
    )
    state = state_of(workdir)
    assert (state["global_step"], state["epoch"], state["step"]) == (30, 1, 7)
    assert len(state["history"]) == 1  # Epoch 1 is done, epoch 2 is not.

    # SIGUSR1 (Slurm's early warning) during the last step: the epoch's saves come first.
    done = run_cli(workdir, f"SIGUSR1:{2 * STEPS}")
    assert f"Resuming {workdir} at epoch 2, step 7 of {STEPS}." in done.stdout.splitlines()
    assert last_line(done, cli.EXIT_STOPPED) == (
        f"error: stopped by SIGUSR1 at step {STEPS} of epoch 2; {again}"
    )
    state = state_of(workdir)
    assert (state["global_step"], state["epoch"], state["step"]) == (46, 2, 0)
    assert not (workdir / "metrics.json").exists()

    done = run_cli(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming {workdir} after its last epoch (2): evaluating." in done.stdout
    assert_same_final_state(workdir, uninterrupted)
    ours, theirs = (_columns(w / "history.csv") for w in (workdir, uninterrupted))
    assert ours["epoch"] == ["0", "1"]
    # The test metrics of each epoch (the training means of an epoch resumed midway are the
    # means over its steps after the resume).
    assert {k: v for k, v in ours.items() if k.startswith("test_")} == {
        k: v for k, v in theirs.items() if k.startswith("test_")
    }
    assert logged_epochs(workdir) == logged_epochs(uninterrupted) == [0, 1]  # Each epoch once.
    assert [p.name for p in workdir.rglob(".*")] == []


@pytest.mark.slow
def test_sigterm_sent_from_outside_at_any_moment_loses_nothing(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cskd_tf.train", *FLAGS, f"--workdir={workdir}"],
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        # TensorBoard's folder appears just before training starts.
        while not (workdir / "tensorboard").exists() and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = last_line(done, cli.EXIT_STOPPED)
    found = re.fullmatch(
        r"error: stopped by SIGTERM at step (\d+) of epoch (\d); saved, rerun the same command to "
        r"resume\.",
        line,
    )
    assert found, line
    step, epoch = int(found.group(1)), int(found.group(2))
    # Nothing lost: the checkpoint is the step the line names, whichever it was.
    assert state_of(workdir)["global_step"] == (epoch - 1) * STEPS + step >= 1
    done = run_cli(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_final_state(workdir, uninterrupted)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_a_new_run_leaves_no_folder(tmp_path):
    new = tmp_path / "new"
    done = run_cli(new, "SIGINTx2:3")
    assert last_line(done, cli.EXIT_STOPPED) == (
        "error: stopped at once by a second Ctrl-C after step 2 of epoch 1, unsaved; no "
        "checkpoint had been saved yet: rerun the same command to start again."
    )
    assert not new.exists()

    started = tmp_path / "started"
    flags = (*FLAGS[:-2], "--save_every_steps=5")
    done = run_cli(started, "SIGINTx2:9", flags)
    assert last_line(done, cli.EXIT_STOPPED) == (
        f"error: stopped at once by a second Ctrl-C after step 8 of epoch 1, unsaved; the last "
        f"intact checkpoint is {started}/checkpoints/resume/ckpt-000000005, at step 5 of epoch "
        f"1: rerun the same command to resume."
    )
    assert checkpoints_of(started) == ["ckpt-000000005"]


def test_a_signal_before_training_stops_at_once_and_leaves_no_folder(tmp_path, monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    load = train._data

    def data_then_sigterm(config, method):  # SIGTERM while the data set loads.
        out = load(config, method)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train, "_data", data_then_sigterm)
    workdir = tmp_path / "run"
    with pytest.raises(cli.Stopped) as err:
        train.run(backbone="mlp", epochs=1, workdir=str(workdir), verbose=0)
    assert str(err.value) == (
        "stopped by SIGTERM before training began; nothing was saved, rerun the same command "
        "to start."
    )
    assert not workdir.exists()
    assert signal.getsignal(signal.SIGTERM) is previous  # Handlers only for the run.


def test_stop_request_records_the_first_signal_and_a_second_ctrl_c_stops_at_once():
    stop = checkpointing.StopRequest()
    before = {s: signal.getsignal(getattr(signal, s)) for s in checkpointing.STOP_SIGNALS}
    with stop.installed():
        assert stop.due() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == stop.due() == "SIGUSR1" and not stop.elsewhere()
        os.kill(os.getpid(), signal.SIGTERM)  # A later SIGTERM (Slurm's, at the limit): no change.
        assert stop.received == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # The handler runs at the next bytecode; never reached.
    assert {s: signal.getsignal(getattr(signal, s)) for s in checkpointing.STOP_SIGNALS} == before
    # Under an all-reduce the agreed signal is what counts, even one this worker did not get.
    other = checkpointing.StopRequest()
    other.collective, other.agreed = True, "SIGTERM"
    assert other.due() == "SIGTERM" and other.elsewhere()


def test_stop_request_outside_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with checkpointing.StopRequest().installed() as stop:
            seen.append((stop, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen[0][1] is before


LOST = (
    "{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/replica:0/"
    "task:0/device:CPU:0}} Collective ops is aborted by: Error reported from /job:worker/task:1: "
    "The following tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1"
    "\nThe tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. "
    "preemption, eviction) to debug further. [Op:CollectiveReduceV2] name: "
)  # What TensorFlow 2.21 raised on worker 0 when worker 1 died.


def test_lost_peer_names_the_task_tensorflow_reports():
    assert distributed.lost_peer(tf.errors.UnavailableError(None, None, LOST)) == (
        "/job:worker/replica:0/task:1"
    )
    # Without the heartbeat list: any other task the error names, never this worker's own.
    text = "Collective ops is aborted by: /job:worker/replica:0/task:0 and /job:worker/task:2 ..."
    worker0 = types.SimpleNamespace(
        cluster_resolver=types.SimpleNamespace(task_type="worker", task_id=0)
    )
    assert distributed.lost_peer(tf.errors.AbortedError(None, None, text), worker0) == (
        "/job:worker/replica:0/task:2"
    )
    assert distributed.lost_peer(tf.errors.DeadlineExceededError(None, None, "timed out")) == (
        "a peer"
    )
    assert distributed.lost_peer(tf.errors.InvalidArgumentError(None, None, LOST)) is None
    assert distributed.lost_peer(ValueError(LOST)) is None


# --- Two workers on localhost ----------------------------------------------------------------

# smoke.flags holds 10% of the 1,438 digits out: 1,295 in batches of 64, 21 steps per epoch.
WORKER_FLAGS = (
    "--flagfile=" + str(REPO / "configs/smoke.flags"),
    "--strategy=multi_worker",
    "--epochs=2",
    "--deterministic",
)


def launch_workers(workdir, flags, crashes=(None, None), timeout=600):
    """Runs the training command on two workers of one cluster; returns their CompletedProcess."""
    cluster = {"worker": [f"localhost:{p}" for p in free_ports(len(crashes))]}
    procs = []
    for index, crash in enumerate(crashes):
        env = _env(crash)
        env.update(
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            TF_CPP_MIN_LOG_LEVEL="3",
            CUDA_VISIBLE_DEVICES="",
        )
        args = [sys.executable, "-m", "cskd_tf.train", *flags, f"--workdir={workdir}"]
        procs.append(
            subprocess.Popen(
                args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        )
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return results


@pytest.mark.slow
def test_a_signal_to_one_worker_stops_both_after_the_same_step_and_they_resume_exactly(tmp_path):
    flags = (*WORKER_FLAGS, "--save_every_steps=0")
    reference, workdir = tmp_path / "uninterrupted", tmp_path / "run"
    for done in launch_workers(reference, flags):
        assert done.returncode == 0, done.stderr[-3000:]

    # SIGTERM to worker 1 only, during its step 8: the chief learns it from the all-reduce.
    chief, other = launch_workers(workdir, flags, crashes=(None, "SIGTERM:8"))
    again = "saved, restart every worker with the same command to resume."
    assert last_line(chief, cli.EXIT_STOPPED) == (
        f"error: stopped by SIGTERM (sent to another worker) at step 8 of epoch 1; {again}"
    )
    assert last_line(other, cli.EXIT_STOPPED) == (
        f"error: stopped by SIGTERM at step 8 of epoch 1; {again}"
    )
    state = state_of(workdir)
    assert (state["global_step"], state["epoch"], state["step"]) == (8, 0, 8)
    assert checkpoints_of(workdir) == ["ckpt-000000008"]

    resumed = launch_workers(workdir, flags)
    for done in resumed:
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"Resuming {workdir} at epoch 1, step 8 of 21." in done.stdout.splitlines()
    assert_same_final_state(workdir, reference, last_step=42)


@pytest.mark.slow
def test_a_lost_worker_is_named_with_the_last_checkpoint_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    flags = (*WORKER_FLAGS, "--save_every_steps=5")
    chief, lost = launch_workers(workdir, flags, crashes=(None, "step:8"))  # SIGKILL after step 8.
    assert lost.returncode == -signal.SIGKILL
    line = last_line(chief, 1)
    found = re.fullmatch(
        r"error: Lost /job:worker/replica:0/task:1 of the multi-worker job after step (\d+) of "
        r"epoch 1; the last intact checkpoint is (\S+), at step 5 of epoch 1: restart every "
        r"worker with the same command\.",
        line,
    )
    assert found, line
    assert int(found.group(1)) in (8, 9)
    assert found.group(2) == str(workdir / "checkpoints/resume/ckpt-000000005")
    assert state_of(workdir)["global_step"] == 5
