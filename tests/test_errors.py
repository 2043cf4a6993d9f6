"""Every bad input: one `error:` line naming the problem, exit status 2 (1 for a diverged run),
no traceback, and the run folder as it was (a new one never appears; a started one keeps its
checkpoints byte for byte)."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import checkpointing
from cskd_tf import data
from cskd_tf import train
from cskd_tf.data import sources
from cskd_tf.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = ("--dataset=digits", "--backbone=mlp", "--epochs=2", "--batch_size=64")


def run_cli(*args, crash=None):
    env = {k: v for k, v in os.environ.items() if k != checkpointing.CRASH_ENV}
    env.update(CI="true", TF_CPP_MIN_LOG_LEVEL="2")
    if crash:
        env[checkpointing.CRASH_ENV] = crash
    return subprocess.run(
        [sys.executable, "-m", "cskd_tf.train", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def digest(folder):
    out = hashlib.sha256()
    for path in sorted(pathlib.Path(folder).rglob("*")):
        if path.is_file():
            out.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return out.hexdigest()


def assert_one_error_line(done, message, status=2):
    assert done.returncode == status, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-3:]
    assert "Traceback" not in done.stderr


def write_tree(root, counts, size=(12, 12)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A digits run killed at step 8 (23 steps per epoch), its last checkpoint at step 5."""
    workdir = tmp_path_factory.mktemp("errors") / "started"
    done = run_cli(*DEMO, "--save_every_steps=5", f"--workdir={workdir}", crash="step:8")
    assert done.returncode < 0, done.stderr[-3000:]
    assert checkpointing.ResumeStore(workdir / "checkpoints").read_state()["global_step"] == 5
    return workdir


# Each case: extra flags (formatted with {tmp} and {flagfile}) and the message. These run
# against the started run folder: flag errors answer before anything is read, value errors
# before the folder is touched, and a resume with other flags is refused.
STARTED_CASES = {
    "unknown flag": (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    "misspelled flag": (["--temprature=2"], "Did you mean: temperature"),
    "malformed flagfile": (["--flagfile={flagfile}"], "flag --batch_size=ten: invalid literal"),
    "missing flagfile": (["--flagfile={tmp}/none.flags"], "Unable to open flagfile"),
    "unknown data set": (["--dataset=imagenette"], "Unknown data set 'imagenette'"),
    "unknown backbone": (["--backbone=resnet9"], "Unknown backbone 'resnet9'"),
    "unknown method": (["--method=cskd2"], "flag --method=cskd2: value should be one of <ce|cskd|"),
    "temperature 0": (["--temperature=0"], "--temperature must be > 0, got 0.0"),
    "negative temperature": (["--temperature=-4"], "--temperature must be > 0, got -4.0"),
    "negative lambda": (["--lambda_cls=-1"], "--lambda_cls must be >= 0, got -1.0"),
    "negative sample lambda": (["--lambda_sample=-0.5"], "--lambda_sample must be >= 0"),
    "val_split 1": (["--val_split=1"], "--val_split must be in [0, 1), got 1.0"),
    "val_split negative": (["--val_split=-0.1"], "--val_split must be in [0, 1), got -0.1"),
    "other backbone": (["--backbone=small_convnet"], "was started with --backbone=mlp, not"),
    "other data set": (
        ["--dataset=folder", "--data_dir={tmp}/tree"],
        "was started with --dataset=digits, not --dataset=folder",
    ),
    "other seed": (["--seed=1"], "was started with --seed=0, not --seed=1"),
}
# These need the data, which is read after the run folder is checked: they run as new runs,
# and no folder may appear.
NEW_CASES = {
    "batch too big": (["--batch_size=5000"], "--batch_size 5000 is larger than the 1438"),
    "adacos on two classes": (
        ["--dataset=folder", "--data_dir={tmp}/tree", "--method=adacos", "--batch_size=2"],
        "--method=adacos on 'folder': AdaCosHead needs num_classes >= 3, got 2.",
    ),
    "missing data dir": (["--dataset=mit67", "--data_dir={tmp}/nowhere"], "which does not exist"),
    "no data dir": (["--dataset=mit67"], "pass --data_dir=ROOT with ROOT/train/<class>/*.jpg"),
    "empty data dir": (["--dataset=mit67", "--data_dir={tmp}/empty"], "needs image folders"),
    "class folder without images": (
        ["--dataset=mit67", "--data_dir={tmp}/hollow"],
        "/hollow/train/b has no images",
    ),
}


def _inputs(args, tmp_path):
    flagfile = tmp_path / "bad.flags"
    flagfile.write_text("--epochs=2\n--batch_size=ten\n")
    write_tree(tmp_path / "tree", {"a": 2, "b": 2})
    (tmp_path / "empty").mkdir()
    write_tree(tmp_path / "hollow", {"a": 2})
    (tmp_path / "hollow/train/b").mkdir()
    return [a.format(tmp=tmp_path, flagfile=flagfile) for a in args]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STARTED_CASES))
def test_bad_input_leaves_the_started_run_as_it_was(case, started, tmp_path):
    args, message = STARTED_CASES[case]
    args = _inputs(args, tmp_path)
    before = digest(started)
    done = run_cli(*DEMO, *args, f"--workdir={started}")
    assert_one_error_line(done, message)
    assert digest(started) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", list(NEW_CASES))
def test_bad_input_of_a_new_run_leaves_no_folder(case, tmp_path):
    args, message = NEW_CASES[case]
    args = _inputs(args, tmp_path)
    workdir = tmp_path / "new"
    done = run_cli(*DEMO, *args, f"--workdir={workdir}")
    assert_one_error_line(done, message)
    assert not workdir.exists()


@pytest.mark.slow
def test_a_folder_run_resumed_with_another_number_of_classes_is_refused(tmp_path):
    tree = tmp_path / "tree"
    write_tree(tree, {"a": 3, "b": 3})
    workdir = tmp_path / "run"
    flags = ("--dataset=folder", f"--data_dir={tree}", "--backbone=mlp", "--batch_size=2")
    args = (*flags, "--epochs=2", "--save_every_steps=1", f"--workdir={workdir}")
    assert run_cli(*args, crash="step:2").returncode < 0
    write_tree(tree, {"c": 3})  # A third class appears.
    before = digest(workdir)
    done = run_cli(*args)
    assert_one_error_line(done, "was trained on 2 classes, but 'folder' now has 3")
    assert digest(workdir) == before


@pytest.mark.slow
def test_a_run_started_before_pytorch_batch_norm_is_refused(started, tmp_path):
    # A copy of the started run whose checkpoint is as cskd_tf 0.1 wrote it: no format.
    workdir = tmp_path / "old"
    subprocess.run(["cp", "-r", str(started), str(workdir)], check=True)
    store = checkpointing.ResumeStore(workdir / "checkpoints")
    state_file = pathlib.Path(store.latest()) / checkpointing.STATE_FILE
    state = json.loads(state_file.read_text())
    assert state.pop("format") == checkpointing.FORMAT and state.pop("version")
    state_file.write_text(json.dumps(state))
    before = digest(workdir)
    done = run_cli(f"--flagfile={workdir / 'flags.txt'}", f"--workdir={workdir}")
    assert_one_error_line(done, "was started by cskd_tf 0.1, whose training computed batch-norm")
    assert digest(workdir) == before


@pytest.mark.slow
def test_an_undecodable_image_is_named_and_no_run_folder_is_left(tmp_path):
    tree = tmp_path / "tree"
    write_tree(tree, {"a": 3, "b": 3})
    (tree / "train/b/broken.png").write_bytes(b"not an image at all")
    workdir = tmp_path / "run"
    done = run_cli(
        "--dataset=folder", f"--data_dir={tree}", "--backbone=mlp", "--batch_size=7",
        "--epochs=1", f"--workdir={workdir}",
    )  # fmt: skip
    assert_one_error_line(done, f"Cannot decode the image {tree}/train/b/broken.png")
    assert not workdir.exists()


@pytest.mark.slow
def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "nan"
    # A learning rate of 1e30 overflows the weights within a few steps.
    done = run_cli(*DEMO, "--lr=1e30", "--save_every_steps=1", f"--workdir={workdir}")
    assert_one_error_line(done, "The training loss became NaN or infinite at step", status=1)
    state = checkpointing.ResumeStore(workdir / "checkpoints").read_state()
    if state is None:  # Diverged before the first save: nothing is left.
        assert "no checkpoint had been saved yet" in done.stderr and not workdir.exists()
        return
    assert f"the last good checkpoint (step {state['global_step']})" in done.stderr
    step = int(done.stderr.split("at step ")[1].split()[0])
    assert step > state["global_step"]
    # The kept checkpoint is a good one: finite weights.
    folder = checkpointing.ResumeStore(workdir / "checkpoints").latest()
    with h5py.File(os.path.join(folder, checkpointing.WEIGHTS_FILE)) as f:
        arrays = []
        f.visititems(lambda _, o: arrays.append(o[()]) if isinstance(o, h5py.Dataset) else None)
    assert arrays and all(np.all(np.isfinite(a)) for a in arrays)
    assert not (workdir / "metrics.json").exists()


def test_labels_outside_the_classes_are_refused_before_the_folder_appears(tmp_path, monkeypatch):
    digits = sources.load_digits()
    bad = sources.Split(digits.train.values, digits.train.labels.copy(), "pixels")
    bad.labels[3] = 10  # Ten classes: 0..9.
    source = sources.DataSource("digits", 10, bad, digits.test, "digits")
    monkeypatch.setattr(data, "load", lambda name, data_dir=None: source)
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train.run(backbone="mlp", epochs=1, workdir=str(workdir), verbose=0)
    assert str(err.value) == (
        "The training split of 'digits' has labels from 0 to 10, outside the 10 classes [0, 9]."
    )
    assert not workdir.exists()
