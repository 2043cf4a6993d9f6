import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import distributed
from cskd_tf import train
from cskd_tf.errors import UserError
from localhost import free_ports  # tests/localhost.py

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One worker of a two-worker cluster: CS-KD on fixed pairs through fit_multi_worker.
WORKER = """
import sys
import numpy as np
import keras
import tensorflow as tf

from cskd_tf import distributed
from cskd_tf import optim
from cskd_tf.model import CSKDModel
from cskd_tf import backbones

strategy = distributed.make_strategy("multi_worker")  # First: it configures the runtime.
sys.path.insert(0, sys.argv[3])
from test_distributed import fixed_pairs, build

chief = distributed.is_chief(strategy)
with strategy.scope():
    model = build()
callbacks = []
if chief:
    callbacks = [keras.callbacks.ModelCheckpoint(sys.argv[1] + "/last.keras")]
history = distributed.fit_multi_worker(model, fixed_pairs(), epochs=2, callbacks=callbacks, verbose=0)
np.save(sys.argv[2], np.concatenate([w.numpy().ravel() for w in model.backbone.weights]))
print("LOSS", history.history["loss"][-1], "CHIEF", chief)
"""

SHAPE, CLASSES = (4, 4, 1), 3


def fixed_pairs(n=40, batch_size=8):
    """Five global batches of fixed anchors and partners."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    x_pair = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=n)
    return tf.data.Dataset.from_tensor_slices(((x, x_pair), y)).batch(batch_size)


def build():
    """CS-KD on an MLP (no batch-norm) with the paper's SGD: momentum and coupled decay."""
    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top
    from cskd_tf import optim  # pylint: disable=g-import-not-at-top
    from cskd_tf.model import CSKDModel  # pylint: disable=g-import-not-at-top

    keras.utils.set_random_seed(0)
    model = CSKDModel(backbones.get("mlp", CLASSES, SHAPE), temperature=4.0, lambda_cls=2.0)
    model.compile(
        optimizer=optim.CoupledWeightDecaySGD(0.1, momentum=0.9, coupled_weight_decay=1e-3),
        metrics=["accuracy"],
    )
    return model


def launch(command_for, tmp_path, count=2, timeout=240, extra_env=None):
    """Starts `count` workers on loopback ports; returns their completed processes."""
    ports = free_ports(count)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for index in range(count):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(config),
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=str(ROOT),
            CUDA_VISIBLE_DEVICES="",
            **(extra_env or {}),
        )
        procs.append(
            subprocess.Popen(
                command_for(index),
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return results


@pytest.mark.slow
def test_two_workers_end_with_the_weights_of_one_process(tmp_path):
    folders = [tmp_path / f"w{i}" for i in range(2)]
    for folder in folders:
        folder.mkdir()
    tests = str(pathlib.Path(__file__).parent)
    results = launch(
        lambda i: [sys.executable, "-c", WORKER, str(folders[i]), str(folders[i] / "w.npy"), tests],
        tmp_path,
    )
    for code, out, err in results:
        assert code == 0, err[-3000:]
    # One process, the same global batches, Keras' own fit.
    model = build()
    history = model.fit(fixed_pairs(), epochs=2, verbose=0, shuffle=False).history
    expected = np.concatenate([w.numpy().ravel() for w in model.backbone.weights])
    for folder in folders:
        np.testing.assert_allclose(np.load(folder / "w.npy"), expected, rtol=1e-5, atol=1e-6)
    # The logged loss is the global one, not a worker's share.
    for _, out, _ in results:
        loss = float(out.split("LOSS ")[1].split()[0])
        assert loss == pytest.approx(history["loss"][-1], rel=1e-5)
    # Only the chief (worker 0) wrote its checkpoint.
    assert "CHIEF True" in results[0][1] and "CHIEF False" in results[1][1]
    assert (folders[0] / "last.keras").exists()
    assert sorted(os.listdir(folders[1])) == ["w.npy"]


@pytest.mark.slow
def test_training_command_runs_on_two_workers_and_the_chief_writes_the_run(tmp_path):
    workdir = tmp_path / "run"

    def command(index):
        # A shared file system: both name the same folder, only the chief writes it.
        return [
            sys.executable,
            "-m",
            "cskd_tf.train",
            "--flagfile=" + str(ROOT / "configs/smoke.flags"),
            "--strategy=multi_worker",
            "--epochs=2",
            f"--workdir={workdir}",
        ]

    results = launch(command, ROOT)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["num_examples"] == 359 and 0 <= metrics["top1_error"] <= 1
    assert "--strategy=multi_worker" in (workdir / "flags.txt").read_text()
    history = (workdir / "history.csv").read_text().splitlines()
    assert len(history) == 3  # A header and two epochs.
    assert f"Wrote {workdir}/metrics.json" in results[0][1]
    assert "Wrote" not in results[1][1]


# 1,295 training digits (smoke.flags holds 10% out) in batches of 128: 11 steps per epoch.
RESUMED_RUN = (
    "--flagfile=" + str(ROOT / "configs/smoke.flags"),
    "--epochs=4",
    "--batch_size=128",
    "--save_every_steps=5",
)


@pytest.mark.slow
def test_two_workers_resumed_mid_epoch_end_with_the_weights_of_one_uninterrupted_process(
    tmp_path,
):
    """The path `train.run` takes on several workers: `fit_multi_worker` with `steps_per_epoch`
    given, after a resume with `initial_epoch > 0`, against one process's Keras `fit`.

    Both workers are killed after step 17 (the last save is step 15: epoch 1, 4 steps done)
    and the same command resumes them: `train._fit` finishes epoch 1 (`initial_epoch=1`,
    `steps_per_epoch=7`, the epoch's dataset less its first 4 batches), then runs epochs 2
    and 3 from one dataset of both (`initial_epoch=2`, `steps_per_epoch=11`). The final weights
    and test metrics are those of one uninterrupted process, and the final state counts the
    epochs as it does.

    Mutants run (the two other multi-worker tests pass with each): (1) `iterator = None` in
    `fit_multi_worker`, so that every epoch iterates its dataset anew (the other branch):
    epoch 0 of the killed run reads the run's 44 batches, its mid-epoch saves stop at step 10,
    and `(state["global_step"], state["epoch"], state["step"]) == (15, 1, 4)` fails with
    (10, 0, 10); (2) `range(epochs - initial_epoch)` for `range(initial_epoch, epochs)` (a
    resumed call numbers its epochs from 0; the weights stay right): the final state's check
    `== (44, 4, 0)` fails with (44, 2, 0).
    """
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top
    from cskd_tf import saving  # pylint: disable=g-import-not-at-top

    workdir, reference = tmp_path / "workers", tmp_path / "one"

    def command(strategy, folder):
        return lambda index: [
            sys.executable, "-m", "cskd_tf.train", *RESUMED_RUN, f"--strategy={strategy}",
            f"--workdir={folder}",
        ]  # fmt: skip

    killed = launch(
        command("multi_worker", workdir), ROOT, timeout=600,
        extra_env={checkpointing.CRASH_ENV: "step:17"},
    )  # fmt: skip
    for code, _, err in killed:
        assert code == -9, err[-3000:]  # SIGKILL, each after its step 17.
    state = checkpointing.ResumeStore(workdir / "checkpoints").read_state()
    assert (state["global_step"], state["epoch"], state["step"]) == (15, 1, 4)
    resumed = launch(command("multi_worker", workdir), ROOT, timeout=600)
    for code, _, err in resumed:
        assert code == 0, err[-3000:]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    single = subprocess.run(command("auto", reference)(0), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600, check=False)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    for folder in (workdir, reference):
        state = checkpointing.ResumeStore(folder / "checkpoints").read_state()
        assert (state["global_step"], state["epoch"], state["step"]) == (44, 4, 0)
    ours, theirs = (saving.load_model(w / "checkpoints/last.keras") for w in (workdir, reference))
    assert [w.path for w in ours.weights] == [w.path for w in theirs.weights]
    for a, b in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=a.path)  # fmt: skip
    ours, theirs = (json.loads((w / "metrics.json").read_text()) for w in (workdir, reference))
    assert ours["nll"] == pytest.approx(theirs["nll"], rel=1e-3)
    assert ours["top1_error"] == pytest.approx(theirs["top1_error"], abs=1.5 / 359)
    rows = (workdir / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3"]


def test_strategy_names_are_the_training_flags_and_unknown_ones_are_refused():
    assert distributed.STRATEGIES == train.STRATEGIES
    with pytest.raises(UserError, match="Unknown strategy 'nope'"):
        distributed.make_strategy("nope")


def test_multi_worker_without_tf_config_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="TF_CONFIG environment variable, which is not set"):
        distributed.make_strategy("multi_worker")


def test_single_machine_strategies():
    assert isinstance(distributed.make_strategy("one_device"), tf.distribute.OneDeviceStrategy)
    mirrored = distributed.make_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert distributed.is_chief(mirrored) and not distributed.is_multi_worker(mirrored)
