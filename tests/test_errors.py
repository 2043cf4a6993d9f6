"""Every bad input: one `error:` line naming the problem, exit status 2 (1 for a diverged run),
no traceback, and the run folder as it was (a new one never appears; a started one keeps its
checkpoints byte for byte). And the machine's faults: a run folder that cannot be written (exit 2,
before the data is loaded), a disk that fills up during a save (exit 1, naming the file and the
last intact checkpoint)."""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import h5py
import numpy as np
import pytest
import tensorflow as tf

from cskd_tf import checkpointing
from cskd_tf import cli
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
    "unknown method": (["--method=cskd2"], "flag --method=cskd2: value should be one of <ce|"),
    "temperature 0": (["--temperature=0"], "--temperature must be > 0, got 0.0"),
    "negative temperature": (["--temperature=-4"], "--temperature must be > 0, got -4.0"),
    # Beyond where the loss is exact in float32 (it trained a broken model and exited 0).
    "temperature 1e9": (
        ["--temperature=1e9"],
        "--temperature must be <= 1000, got 1000000000.0: the distillation losses are checked "
        "to be exact in float32 up to T = 1000 only",
    ),
    # Used or refused, never replaced by the paper's default (32 and 30 on digits).
    "batch size 0": (["--batch_size=0"], "--batch_size must be >= 1, got 0."),
    "epochs 0": (["--epochs=0"], "--epochs must be >= 1, got 0."),
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


# --- Explicit values are used or refused -----------------------------------------------------


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(batch_size=0), "--batch_size must be >= 1, got 0."),
        (dict(epochs=0), "--epochs must be >= 1, got 0."),
        (dict(workdir=""), "--workdir is empty: name a run folder, or leave the flag out."),
        (dict(data_dir=""), "--data_dir is empty: name a folder, or leave the flag out."),
        (dict(method="kd", teacher=""), "--teacher is empty: name a run folder, export folder"),
        (dict(temperature=1000.5), "--temperature must be <= 1000, got 1000.5: the distillation"),
        (dict(kd_temperature=2e3), "--kd_temperature must be <= 1000, got 2000.0: the"),
        (dict(dlb_temperature=1e4), "--dlb_temperature must be <= 1000, got 10000.0: the"),
        (dict(tf_kd_temperature=1e9), "--tf_kd_temperature must be <= 1000, got 1000000000.0"),
    ],
)
def test_an_explicit_value_is_used_or_refused_never_replaced(values, message, tmp_path):
    values = {"workdir": str(tmp_path / "run"), **values}
    with pytest.raises(UserError) as err:
        train.run(backbone="mlp", verbose=0, **values)
    assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "run").exists()


STOPPED = "error: stopped by SIGTERM at step 8 of epoch 1; saved, rerun the same command to resume."


@pytest.mark.parametrize("kind,status,line", [
    ("stopped", cli.EXIT_STOPPED, STOPPED),
    ("fault", 1, "error: Cannot write RUN/metrics.json: No space left on device; ..."),
    ("ctrl-c", cli.EXIT_STOPPED, "error: interrupted by Ctrl-C."),
])  # fmt: skip
def test_each_way_to_stop_has_one_line_and_its_exit_status(kind, status, line):
    script = (
        "import sys\n"
        "from cskd_tf import cli\n"
        "def main(argv):\n"
        "    kinds = {'stopped': cli.Stopped, 'fault': cli.Fault, 'ctrl-c': KeyboardInterrupt}\n"
        f"    raise kinds[argv[1]]({line.removeprefix('error: ')!r})\n"
        "cli.run(main)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, kind], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == status
    assert done.stderr.strip().splitlines() == [line]
    assert done.stdout == ""


def test_a_class_without_test_images_is_named_in_one_warning_line(tmp_path, capsys):
    tree = tmp_path / "tree"
    write_tree(tree, {"a": 3, "b": 3, "c": 3})
    shutil.rmtree(tree / "test/c")
    result = train.run(
        dataset="folder", data_dir=str(tree), backbone="mlp", epochs=1, batch_size=3,
        eval_every=0, workdir=str(tmp_path / "run"), verbose=0,
    )  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "warning: the test split of 'folder' has no images of the class 'c': its test metrics "
        "are over the other 2 of 3 classes."
    ]
    assert result["metrics"]["num_examples"] == 6


# --- Faults of the machine ----------------------------------------------------------------------


def _can_mount():
    """Whether this machine lets an unprivileged user namespace mount a tmpfs."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            done = subprocess.run(
                ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                 f"mount -t tmpfs -o size=64k tmpfs {folder}"],
                capture_output=True, timeout=60,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


CAN_MOUNT = _can_mount()


def run_on_tmpfs(mount, options, commands):
    """Runs shell `commands` with a fresh tmpfs (mount `options`) on `mount`, in a user and mount
    namespace of their own: the file system is gone when they end."""
    env = {k: v for k, v in os.environ.items() if k != checkpointing.CRASH_ENV}
    env.update(CI="true", TF_CPP_MIN_LOG_LEVEL="2")
    script = f"mount -t tmpfs -o {options} tmpfs {mount} || exit 99\n{commands}"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode != 99, done.stderr[-3000:]
    return done


def train_command(*args):
    return " ".join([sys.executable, "-m", "cskd_tf.train", *DEMO, *args])


@pytest.mark.slow
def test_a_read_only_run_folder_is_refused_before_the_data_is_loaded(
    started, tmp_path, monkeypatch
):
    mount = tmp_path / "ro"
    mount.mkdir()
    fix = "pass another --workdir, or make it writable."
    if not CAN_MOUNT:  # A writer that raises what a read-only file system does.
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(train.tempfile, "mkstemp", read_only)
        monkeypatch.setattr(data, "load", mock.Mock(side_effect=AssertionError("data loaded")))
        with pytest.raises(UserError) as err:
            train.run(backbone="mlp", epochs=1, workdir=str(mount / "run"), verbose=0)
        assert str(err.value) == (
            f"Cannot write to the run folder {mount}/run (in {mount}): Read-only file system; {fix}"
        )
        return
    # A new run on a read-only file system, and a started run whose file system became one.
    done = run_on_tmpfs(mount, "ro,size=1m", train_command(f"--workdir={mount}/run"))
    refused = f"Cannot write to the run folder {mount}/run (in {mount}): Read-only file system"
    assert_one_error_line(done, f"{refused}; {fix}")
    assert "Epoch" not in done.stdout
    before = digest(started)
    done = run_on_tmpfs(
        mount, "size=4m",
        f"cp -a {started} {mount}/run && mount -o remount,ro {mount} && "
        + train_command("--save_every_steps=5", f"--workdir={mount}/run"),
    )  # fmt: skip
    assert_one_error_line(
        done, f"error: Cannot write to the run folder {mount}/run: Read-only file system; {fix}"
    )
    assert "Resuming" not in done.stdout and digest(started) == before


@pytest.mark.slow
def test_a_full_disk_during_a_save_names_the_file_and_the_last_intact_checkpoint(
    tmp_path, monkeypatch
):
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    mount.mkdir()
    if CAN_MOUNT:
        # Room for the checkpoint of step 5 (~100 kB), not for a second one beside it.
        done = run_on_tmpfs(
            mount, "size=150k",
            train_command("--save_every_steps=5", f"--workdir={mount}/run")
            + f"; status=$?; cp -a {mount}/run {copy}; exit $status",
        )  # fmt: skip
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
        line = done.stderr.strip().splitlines()[-1]
        run = f"{mount}/run"
    else:  # A writer that raises what a full disk does, at the second save.
        calls = []
        write = checkpointing._write_weights

        def fill_up(model, path):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write(model, path)

        monkeypatch.setattr(checkpointing, "_write_weights", fill_up)
        run = str(copy)
        with pytest.raises(cli.Fault) as err:
            train.run(backbone="mlp", epochs=2, batch_size=64, save_every_steps=5, workdir=run,
                      verbose=0)  # fmt: skip
        monkeypatch.undo()
        line = f"error: {err.value}"
    assert line == (
        f"error: Cannot write {run}/checkpoints/resume/ckpt-000000010/state.weights.h5: No space "
        f"left on device; the last intact checkpoint is {run}/checkpoints/resume/ckpt-000000005, "
        f"at step 5 of epoch 1: free space or fix the folder, then rerun the same command to "
        f"resume."
    )
    store = checkpointing.ResumeStore(copy / "checkpoints")
    assert store.read_state()["global_step"] == 5
    assert sorted(os.listdir(copy / "checkpoints/resume")) == ["ckpt-000000005", "latest"]
    # With room again, the same command resumes from that checkpoint.
    done = run_cli(*DEMO, "--save_every_steps=5", f"--workdir={copy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming {copy} at epoch 1, step 5 of 23." in done.stdout


def test_a_run_folder_without_write_permission_is_refused_in_one_sentence(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(train.tempfile, "mkstemp", denied)
    monkeypatch.setattr(data, "load", mock.Mock(side_effect=AssertionError("data loaded")))
    with pytest.raises(UserError) as err:
        train.run(backbone="mlp", epochs=1, workdir=str(tmp_path / "a/b/run"), verbose=0)
    assert str(err.value) == (
        f"Cannot write to the run folder {tmp_path}/a/b/run (in {tmp_path}): Permission denied; "
        f"pass another --workdir, or make it writable."
    )
    assert not (tmp_path / "a").exists()
