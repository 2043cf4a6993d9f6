r"""Trains a classifier with CS-KD or cross-entropy and evaluates it.

    python -m cskd_tf.train                               # offline digits demo
    python -m cskd_tf.train --flagfile=configs/cub.flags  # a paper experiment

The run folder (`--workdir`) receives `flags.txt` (rerun with
`--flagfile=WORKDIR/flags.txt`), TensorBoard logs, `history.csv`,
checkpoints and `metrics.json` (test top-1 / top-5 error, NLL, ECE, AURC and
recall@1, fractions). Every `--eval_every` epochs the same metrics of the
validation split (`val_*`; or, without one, of the test split as `test_*`, for
curves only: nothing is selected on them) go into the history and TensorBoard.

Rerunning the same command with the same `--workdir` resumes an interrupted run
from its last checkpoint (`cskd_tf.checkpointing`) and leaves a finished one as it is.
SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 stop a run after its current step, saved there
(exit status 3, `cskd_tf.cli`).
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

from absl import flags

from cskd_tf import cli as cli_lib
from cskd_tf import methods
from cskd_tf.errors import UserError

PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")  # cskd_tf.distributed's.
_FLAGS = {}

# Per data set: what the paper uses where a flag is left unset.
DEFAULTS = {
    "digits": dict(backbone="small_convnet", epochs=30, batch_size=32),
    "cifar100": dict(backbone="preact_resnet18", epochs=200, batch_size=128),
    "tiny_imagenet": dict(backbone="preact_resnet18", epochs=200, batch_size=128),
    "cub": dict(backbone="resnet18", epochs=200, batch_size=32),
    "stanford_dogs": dict(backbone="resnet18", epochs=200, batch_size=32),
    "mit67": dict(backbone="resnet18", epochs=200, batch_size=32),
    "imagenet": dict(backbone="resnet50", epochs=90, batch_size=256),
    "folder": dict(backbone="resnet18", epochs=200, batch_size=32),
    # Section 3.3: CUB + Dogs + MIT67, 30 per label; the fine-grained sets' recipe.
    "mixed": dict(backbone="resnet18", epochs=200, batch_size=32),
}


def define_flags(flag_values=flags.FLAGS):
    """Defines the training flags, and every registered method's, on `flag_values`.

    Returns:
      dict. The flag holders by name, in the order `run` takes (and `flags.txt` lists) them.
    """
    fv = dict(flag_values=flag_values)
    string = lambda *a: flags.DEFINE_string(*a, **fv)
    integer = lambda *a: flags.DEFINE_integer(*a, **fv)
    real = lambda *a: flags.DEFINE_float(*a, **fv)
    kinds = dict(float=real, integer=integer, string=string)
    holders = dict(
        dataset=string(
            "dataset",
            "digits",
            "Data set: digits (offline demo), "
            "cifar100, cub, stanford_dogs, imagenet (tfds), "
            "tiny_imagenet, mit67, folder (image folders), mixed (CUB + Dogs from tfds, "
            "MIT67 from DATA_DIR/mit67: the paper's hierarchical set).",
        ),
        data_dir=string(
            "data_dir",
            None,
            "tfds data directory, or the root of the image folders ROOT/{train,test}/<class>/*.",
        ),
        backbone=string(
            "backbone",
            None,
            "Backbone name (cskd_tf.backbones); unset: the paper's for the data set.",
        ),
        method=flags.DEFINE_enum(
            "method",
            "cskd",
            methods.names(),
            "Training objective (cskd_tf.methods): "
            + "; ".join(f"{m}: {methods.get(m).title}" for m in methods.names())
            + ".",
            **fv,
        ),
    )
    # Each method's flags, declared by the methods that read them.
    for name, flag in methods.flags().items():
        holders[name] = kinds[flag.kind](
            name, flag.default, f"{', '.join(methods.readers(name))}: {flag.help}"
        )
    holders.update(
        label_smoothing=real(
            "label_smoothing",
            None,
            "Label smoothing of every method's cross-entropy; unset: the method's "
            "(0.1 for --method=label_smoothing), else 0.",
        ),
        entropy_weight=real(
            "entropy_weight",
            None,
            "Confidence penalty beta (CE - beta * entropy) of every method's cross-entropy; "
            "unset: the method's (0.1 for --method=max_entropy), else 0.",
        ),
        epochs=integer("epochs", None, "Epochs; unset: the paper's."),
        batch_size=integer("batch_size", None, "Anchors per step; unset: the paper's."),
        lr=real("lr", 0.1, "Initial learning rate (divided by 10 at 50% and 75%)."),
        momentum=real("momentum", 0.9, "SGD momentum."),
        weight_decay=real(
            "weight_decay",
            1e-4,
            "Weight decay, PyTorch style (added to the gradient of every parameter).",
        ),
        val_split=real(
            "val_split", 0.0, "Fraction of each training class held out for validation, in [0, 1)."
        ),
        eval_every=integer(
            "eval_every",
            1,
            "Report ECE, R@1, ... of the validation (else test) split every this many epochs "
            "(and after the first and the last); 0: only at the end.",
        ),
        jit_compile=flags.DEFINE_bool(
            "jit_compile",
            None,
            "Compile the train step with XLA; unset: Keras' choice (on with a GPU, off on CPU).",
            **fv,
        ),
        mixed_precision=flags.DEFINE_enum(
            "mixed_precision",
            "none",
            PRECISIONS,
            "Keras mixed-precision policy (the logits stay float32; mixed_float16 scales the loss).",
            **fv,
        ),
        strategy=flags.DEFINE_enum(
            "strategy",
            "auto",
            STRATEGIES,
            "Distribution: auto (mirrored when several GPUs are visible), one_device, mirrored, "
            "multi_worker (several machines, from TF_CONFIG).",
            **fv,
        ),
        cpu_replicas=integer(
            "cpu_replicas",
            0,
            "With --strategy=mirrored on a machine without GPUs: split the CPU into this many "
            "replicas (to try multi-replica training without GPUs); 0: one.",
        ),
        seed=integer("seed", 0, "Random seed (weights, sampler, augmentation)."),
        deterministic=flags.DEFINE_bool(
            "deterministic",
            False,
            "TensorFlow op determinism: the same command gives bit-identical weights, and a "
            "resumed run ends with exactly the weights of an uninterrupted one (slower on GPUs).",
            **fv,
        ),
        run_eagerly=flags.DEFINE_bool(
            "run_eagerly",
            False,
            "Debugging: run the training step eagerly, without tf.function (slow on big data; "
            "quick for one step of a big model, as the configs' tests do).",
            **fv,
        ),
        save_every_steps=integer(
            "save_every_steps",
            500,
            "Save the resume state every this many steps (and after every epoch); 0: only "
            "after every epoch. A killed run loses at most the steps since the last save.",
        ),
        workdir=string("workdir", None, "Run folder; unset: runs/DATASET-METHOD-sSEED."),
    )
    return holders


def defaults():
    """Every training flag's default, as `run` takes them."""
    values = flags.FlagValues()
    return {name: values[name].default for name in define_flags(values)}


def _check(condition, message):
    if not condition:
        raise UserError(message)


def _teacher_file(path):
    """The .keras file behind --teacher: a run folder's last checkpoint, an export's model."""
    candidates = [
        path,
        os.path.join(path, "checkpoints", "last.keras"),
        os.path.join(path, "model.keras"),
    ]
    for candidate in candidates:
        if os.path.isfile(candidate) and candidate.endswith(".keras"):
            return candidate
    raise UserError(
        f"--teacher={path} is neither a .keras file, nor a run folder with "
        "checkpoints/last.keras, nor an export folder with model.keras."
    )


@contextlib.contextmanager
def _dtype_policy(name):
    """Builds layers under a Keras dtype policy, then restores the previous one."""
    import keras  # pylint: disable=g-import-not-at-top

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if name == "none" else name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def run(verbose=None, **values):
    """Trains, evaluates on the test split and writes the run folder.

    Args:
      verbose: Keras' verbosity (None: a progress bar on a terminal, one line per
        epoch otherwise).
      **values: the training flags by name (see `define_flags`); the others keep
        their defaults.

    Under `strategy="multi_worker"` every worker runs this function; only the
    chief validates and writes the run folder and evaluates.

    An existing `workdir` written by this function with the same flags is
    resumed from its newest checkpoint (model, optimizer, schedule position,
    epoch and step, best metric, history); a finished one is left as it is.

    Returns:
      dict with `history` (per-epoch logs of the whole run), `metrics` (what
      `metrics.json` holds; None on a worker that is not the chief),
      `workdir`, `model` (None when the run had already finished) and `resumed`
      (the global step it continued from; None for a new run; `"finished"` when
      the run had already finished and nothing was done).
    """
    unknown = sorted(set(values) - set(defaults()))
    if unknown:
        raise TypeError(f"run() got unexpected arguments: {', '.join(unknown)}.")
    config, method = _resolve({**defaults(), **values})

    # --- Strategy and run folder -------------------------------------------------
    # Imported here so that `--help` and flag errors answer at once.
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top
    from cskd_tf import distributed  # pylint: disable=g-import-not-at-top

    # Before any TensorFlow op: a multi-worker strategy must configure the runtime first.
    strategy = distributed.make_strategy(config["strategy"], config["cpu_replicas"])
    chief = distributed.is_chief(strategy)
    workdir = config["workdir"]
    folder = _run_folder(workdir, config) if chief else "new"
    if folder == "finished":
        print(f"{workdir} is a finished run (metrics.json): nothing to do.")
        with open(os.path.join(workdir, "metrics.json")) as f:
            results = json.load(f)
        return dict(history=None, metrics=results, workdir=workdir, model=None, resumed="finished")
    if chief:
        _check_writable(workdir)  # Before the data set is loaded and the model built.
    store = checkpointing.ResumeStore(os.path.join(workdir, "checkpoints"))
    state = store.read_state() if folder == "resume" or not chief else None
    _seed(config)

    # From here on a stop signal stops the run after its current step, and what fails says
    # so in one sentence (`_Guard`).
    stop = checkpointing.StopRequest()
    guard = _Guard(config, store, stop, strategy, new=chief and folder == "new")
    with stop.installed(), guard:
        data = _data(config, method)
        guard.splits = [data.train, data.test, data.val]
        model, context = _model(config, method, data, strategy)
        if state is not None:
            _restore(model, store, state, config, data)
            print(_resuming(workdir, state, config["epochs"], data.steps_per_epoch))
        if not distributed.is_multi_worker(strategy):  # There the workers agree on a step.
            guard.stop_if_signalled(resumed=state is not None)
        run_checkpoint, callbacks = _callbacks(config, data, model, store, state, chief, stop)
        guard.run_checkpoint = run_checkpoint
        history, train_seconds = _fit(
            config, method, data, (model, context), (run_checkpoint, callbacks), state, verbose
        )
        if not chief:  # Another worker: trained in step with the chief, writes nothing.
            return dict(history=history, metrics=None, workdir=None, model=model, resumed=None)
        results = _evaluate(config, data, model, train_seconds if state is None else None)

        # --- Save ------------------------------------------------------------------
        # Written last, and atomically: its presence marks the run finished.
        checkpointing.atomic_write_text(
            os.path.join(workdir, "metrics.json"), json.dumps(results, indent=2, sort_keys=True)
        )
        resumed = state["global_step"] if state else None
        return dict(history=history, metrics=results, workdir=workdir, model=model, resumed=resumed)


def _resuming(workdir, state, epochs, steps_per_epoch):
    """The line a resumed run prints."""
    if state["epoch"] >= epochs:
        return f"Resuming {workdir} after its last epoch ({epochs}): evaluating."
    return (
        f"Resuming {workdir} at epoch {state['epoch'] + 1}, step {state['step']} of "
        f"{steps_per_epoch}."
    )


def _resolve(values):
    """Checks the flags and fills in what they leave unset; returns `(config, method)`.

    `config` holds every flag's value (the paper's where unset), in `define_flags`'
    order: what `flags.txt` records.

    Raises:
      UserError: for an unknown name or a value out of range.
    """
    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top
    from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top

    config = dict(values)
    # An empty value is a value: refused, not taken for "unset".
    for name, what in (("workdir", "a run folder"), ("data_dir", "a folder"),
                       ("teacher", "a run folder, export folder or .keras file")):  # fmt: skip
        _check(
            config.get(name) != "",
            f"--{name} is empty: name {what}, or leave the flag out.",
        )
    dataset = config["dataset"] = sources.ALIASES.get(config["dataset"], config["dataset"])
    _check(
        dataset in sources.names(),
        f"Unknown data set '{dataset}'. Choose one of: {', '.join(sources.names())}.",
    )
    method = methods.get(config["method"])
    for name, value in DEFAULTS[dataset].items():
        if config[name] is None:
            config[name] = value
    for name, value in {"label_smoothing": 0.0, "entropy_weight": 0.0, **method.defaults}.items():
        if config[name] is None:
            config[name] = value
    _check(
        config["backbone"] in backbones.names(),
        f"Unknown backbone '{config['backbone']}'. Choose one of: {', '.join(backbones.names())}.",
    )
    for name, flag in methods.flags().items():  # Every method's flags, whichever is used.
        flag.validate(name, config[name])
    ls, ew = config["label_smoothing"], config["entropy_weight"]
    _check(0 <= ls <= 1, f"--label_smoothing must be in [0, 1], got {ls}.")
    _check(ew >= 0, f"--entropy_weight must be >= 0, got {ew}.")
    _check(
        (config["teacher"] is not None) == method.teacher,
        f"--method={method.name} needs --teacher (a run folder, export folder or .keras file)."
        if method.teacher
        else f"--teacher is only used by --method="
        + " or ".join(m for m in methods.names() if methods.get(m).teacher)
        + f", not {method.name}.",
    )
    if config["teacher"] is not None:
        config["teacher"] = _teacher_file(config["teacher"])
    for name, bound, ok in [
        ("epochs", ">= 1", config["epochs"] >= 1),
        ("batch_size", ">= 1", config["batch_size"] >= 1),
        ("lr", "> 0", config["lr"] > 0),
        ("val_split", "in [0, 1)", 0 <= config["val_split"] < 1),
        ("weight_decay", ">= 0", config["weight_decay"] >= 0),
        ("eval_every", ">= 0", config["eval_every"] >= 0),
        ("save_every_steps", ">= 0", config["save_every_steps"] >= 0),
        ("cpu_replicas", ">= 0", config["cpu_replicas"] >= 0),
    ]:
        _check(ok, f"--{name} must be {bound}, got {config[name]}.")
    _check(
        config["mixed_precision"] in PRECISIONS,
        f"Unknown --mixed_precision '{config['mixed_precision']}'. "
        f"Choose one of: {', '.join(PRECISIONS)}.",
    )
    if config["workdir"] is None:
        config["workdir"] = os.path.join("runs", f"{dataset}-{method.name}-s{config['seed']}")
    return _own_flags(config), method


def _own_flags(values):
    """`values` without the flags of methods other than `values["method"]`'s."""
    own = methods.get(values["method"]).flags
    return {k: v for k, v in values.items() if k not in methods.flags() or k in own}


def _seed(config):
    import keras  # pylint: disable=g-import-not-at-top

    keras.utils.set_random_seed(config["seed"])
    if config["deterministic"]:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        tf.config.experimental.enable_op_determinism()


class _Data:
    """The splits of a run and how its training batches are made."""

    def __init__(self, source, train, val, test, augmenter, batch_size):
        self.source, self.train, self.val, self.test = source, train, val, test
        self.augmenter = augmenter
        self.steps_per_epoch = math.ceil(len(train) / batch_size)


def _data(config, method):
    """Loads the data set and splits off the validation set; checks it fits the method."""
    from cskd_tf import data  # pylint: disable=g-import-not-at-top
    from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top

    dataset, batch_size = config["dataset"], config["batch_size"]
    source = data.load(dataset, config["data_dir"])
    train, test, val = source.train, source.test, None
    streamed = not isinstance(train, sources.Split)
    if config["val_split"] > 0:
        _check(
            not streamed,
            f"--val_split needs random access to the training set, which the "
            f"streamed data set '{dataset}' lacks.",
        )
        train, val = data.stratified_split(train, config["val_split"], seed=config["seed"])
    _check(
        batch_size <= len(train),
        f"--batch_size {batch_size} is larger than the {len(train)} training examples.",
    )
    for name, split in (("training", train), ("test", test), ("validation", val)):
        _check_labels(split, source.num_classes, name, dataset)
    _warn_untested_classes(source, train, test)
    _check(
        not (streamed and method.batches.clean),
        f"--method={method.name} needs the clean view of each anchor, which the streamed "
        f"data set '{dataset}' does not provide.",
    )
    _check(
        not (streamed and method.batches.partner == "self"),
        f"--method={method.name} needs two views of each image, which the streamed data set "
        f"'{dataset}' does not provide.",
    )
    augmenter = data.Augmenter(source.preset, seed=config["seed"])
    return _Data(source, train, val, test, augmenter, batch_size)


def _training_batches(config, method, data, context, epoch_range, skip):
    """The training batches of the epochs in `epoch_range`, less `skip` of the first."""
    from cskd_tf.data import pairs  # pylint: disable=g-import-not-at-top

    ds = pairs.training_dataset(
        data.train,
        method.batches,
        config["batch_size"],
        seed=config["seed"],
        augmenter=data.augmenter,
        epochs=epoch_range,
        skip=skip,
    )
    if method.transform is not None:
        first = epoch_range.start * data.steps_per_epoch + skip
        ds = method.transform(ds, config, context, first)
    return ds


def _model(config, method, data, strategy):
    """Builds the backbone, the method's model around it, and compiles it.

    Returns:
      `(model, context)`: the compiled model and what the method was told of the run.
    """
    import keras  # pylint: disable=g-import-not-at-top

    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top
    from cskd_tf import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import losses  # pylint: disable=g-import-not-at-top
    from cskd_tf import saving  # pylint: disable=g-import-not-at-top
    from cskd_tf.optim import CoupledWeightDecaySGD, step_schedule  # pylint: disable=g-import-not-at-top

    source, shape = data.source, data.augmenter.input_shape
    context = methods.Context(
        dataset=config["dataset"],
        backbone=config["backbone"],
        num_classes=source.num_classes,
        input_shape=tuple(shape),
        train_size=len(data.train),
        epochs=config["epochs"],
        steps_per_epoch=data.steps_per_epoch,
    )
    if method.check is not None:
        method.check(config, context)
    with strategy.scope(), _dtype_policy(config["mixed_precision"]):
        net = backbones.get(config["backbone"], source.num_classes, shape)
        if method.teacher:
            teacher = callbacks_lib.classifier_of(saving.load_model(config["teacher"]))
            _check(
                tuple(teacher.output.shape[1:]) == (source.num_classes,)
                and tuple(teacher.input.shape[1:]) == tuple(shape),
                f"The teacher {config['teacher']} maps {teacher.input.shape[1:]} to "
                f"{teacher.output.shape[1:]}, but '{config['dataset']}' needs "
                f"{shape} to ({source.num_classes},).",
            )
            context = dataclasses.replace(context, teacher=teacher)
        model = method.make_model(net, config, context)
        model.compile(
            optimizer=CoupledWeightDecaySGD(
                step_schedule(config["lr"], config["epochs"], data.steps_per_epoch),
                momentum=config["momentum"],
                coupled_weight_decay=config["weight_decay"],
            ),
            loss=losses.ClassificationLoss(config["label_smoothing"], config["entropy_weight"]),
            metrics=[
                # Soft labels (Mixup): accuracy against their larger share.
                keras.metrics.CategoricalAccuracy(name="accuracy")
                if method.soft_labels
                else keras.metrics.SparseCategoricalAccuracy(name="accuracy")
            ],
            jit_compile="auto" if config["jit_compile"] is None else config["jit_compile"],
            run_eagerly=config["run_eagerly"],
        )
    return model, context


def _restore(model, store, state, config, data):
    """Loads the newest checkpoint of a resumed run into `model`, after checking it fits."""
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top

    workdir, dataset = config["workdir"], config["dataset"]
    _check(
        state.get("format") == checkpointing.FORMAT,
        f"The run folder {workdir} was started by cskd_tf {state.get('version', '0.1')}, "
        f"whose training computed batch-norm and the pass order differently; this "
        f"version cannot continue it: finish it with that version, or pass another "
        f"--workdir.",
    )
    num_classes = data.source.num_classes
    _check(
        state.get("num_classes") == num_classes,
        f"The run folder {workdir} was trained on {state.get('num_classes')} classes, "
        f"but '{dataset}' now has {num_classes}: pass another --workdir.",
    )
    with model.distribute_strategy.scope():
        try:
            store.restore(model)
        except (ValueError, OSError) as err:
            raise UserError(
                f"The checkpoint in {store.latest()} does not fit this model ({err}); "
                f"pass another --workdir."
            ) from None


def _callbacks(config, data, model, store, state, chief, stop=None):
    """The resume checkpoint, the per-epoch evaluation and TensorBoard; makes the folder."""
    import cskd_tf  # pylint: disable=g-import-not-at-top
    from cskd_tf import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top

    workdir, eval_every = config["workdir"], config["eval_every"]
    test_ds, val_ds = _eval_datasets(config, data)
    monitor = "val_top1_error" if val_ds is not None and eval_every else None
    checkpoints = os.path.join(workdir, "checkpoints")
    run_checkpoint = checkpointing.RunCheckpoint(
        checkpoints,
        data.steps_per_epoch,
        every_steps=config["save_every_steps"],
        state=state,
        monitor=monitor,
        info=dict(
            num_classes=data.source.num_classes,
            dataset=config["dataset"],
            backbone=config["backbone"],
            format=checkpointing.FORMAT,
            version=cskd_tf.__version__,
        ),
        save=chief,
        stop=stop,
    )
    callbacks = []
    if eval_every and chief:
        # Before the checkpoints and loggers, so that they see its metrics.
        monitored, prefix = (val_ds, "val_") if val_ds is not None else (test_ds, "test_")
        callbacks.append(callbacks_lib.EvaluationCallback(monitored, eval_every, prefix))
    if chief:
        # Everything is validated: only now does the run folder appear.
        flags_path = os.path.join(workdir, "flags.txt")
        try:
            os.makedirs(checkpoints, exist_ok=True)
            store.clean()  # What a killed save may have left.
        except OSError as err:
            raise checkpointing.WriteError(checkpoints, err) from err
        if not os.path.isfile(flags_path):
            _write_flagfile(flags_path, config)
        # Before the checkpoint, which stops training at an epoch's end when a signal came:
        # that epoch is complete and logged; one cut short by a stop is not.
        tensorboard = os.path.join(workdir, "tensorboard")
        callbacks.append(callbacks_lib.EpochTensorBoard(tensorboard, profile_batch=0))
    callbacks.append(run_checkpoint)
    return run_checkpoint, callbacks


def _eval_datasets(config, data):
    """The test and (with `--val_split`) validation batches, evaluation preprocessing."""
    from cskd_tf import data as data_lib  # pylint: disable=g-import-not-at-top

    batch_size, augment = config["batch_size"], data.augmenter.eval
    test = data_lib.split_dataset(data.test, batch_size, augment=augment)
    val = data.val
    val = data_lib.split_dataset(val, batch_size, augment=augment) if val and len(val) else None
    return test, val


def _fit(config, method, data, built, callbacks, state, verbose):
    """Trains from where `state` left off; returns the run's per-epoch history and its time.

    `built` is `_model`'s `(model, context)`, `callbacks` `_callbacks`' `(run_checkpoint,
    callbacks)`.
    """
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top
    from cskd_tf import distributed  # pylint: disable=g-import-not-at-top

    (model, context), (run_checkpoint, callbacks) = built, callbacks
    strategy = model.distribute_strategy
    chief = distributed.is_chief(strategy)
    multi_worker = distributed.is_multi_worker(strategy)
    epochs, steps_per_epoch = config["epochs"], data.steps_per_epoch
    first_epoch, first_step = (state["epoch"], state["step"]) if state else (0, 0)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    start = time.time()
    # The validation split is scored by the EvaluationCallback (one pass for every
    # metric), not by Keras' own validation loop. An epoch interrupted midway is
    # finished first, on its own, then the remaining epochs.
    parts = [(first_epoch, first_epoch + 1, first_step)] if first_step else []
    parts.append((first_epoch + bool(first_step), epochs, 0))
    for begin, end, skip in parts:
        if begin >= end or run_checkpoint.diverged_at is not None or run_checkpoint.stopped:
            continue
        batches = _training_batches(config, method, data, context, range(begin, end), skip)
        if multi_worker:  # Keras 3.15's fit fails there (#20585).
            distributed.fit_multi_worker(
                model,
                batches,
                end,
                callbacks,
                verbose if chief else 0,
                initial_epoch=begin,
                steps_per_epoch=steps_per_epoch - skip,
                stop=run_checkpoint.stop,
            )
        else:
            model.fit(
                batches,
                epochs=end,
                initial_epoch=begin,
                steps_per_epoch=steps_per_epoch - skip,
                shuffle=False,
                callbacks=callbacks,
                verbose=verbose,
            )
    train_seconds = time.time() - start
    checkpoints = os.path.join(config["workdir"], "checkpoints")
    if chief and first_epoch >= epochs:  # Killed between the last epoch's two saves.
        checkpointing.atomic_save_model(model, os.path.join(checkpoints, "last.keras"))
    if run_checkpoint.diverged_at is not None:
        step, good = run_checkpoint.diverged_at, run_checkpoint.store.read_state()
        kept = (
            f"the last good checkpoint (step {good['global_step']}) is in {checkpoints}"
            if good
            else "no checkpoint had been saved yet"
        )
        raise FloatingPointError(
            f"The training loss became NaN or infinite at step {step} (epoch "
            f"{(step - 1) // steps_per_epoch + 1}); {kept} (lower --lr or check the data)."
        )
    if run_checkpoint.stopped:
        where = run_checkpoint.stopped
        signal = where["signal"] + (" (sent to another worker)" if where["elsewhere"] else "")
        again = "restart every worker with the same command" if multi_worker else (
            "rerun the same command"
        )
        raise cli_lib.Stopped(
            f"stopped by {signal} at step {where['step']} of epoch {where['epoch'] + 1}; "
            f"saved, {again} to resume."
        )
    history = {k: [epoch.get(k) for epoch in run_checkpoint.history]
               for k in run_checkpoint.history[-1]}  # fmt: skip
    return history, train_seconds


def _evaluate(config, data, model, train_seconds):
    """Last-epoch metrics on the test split (and the validation split), as `metrics.json`.

    Nothing here is selected on the test set (REFERENCE.md).
    """
    from cskd_tf import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

    predictor = callbacks_lib.Predictor(model)
    source = data.source

    def score(dataset):
        out = predictor(dataset)
        return metrics_lib.classification_metrics(
            out.logits,
            out.labels,
            features=out.features,
            groups=source.groups,
            group_names=source.group_names,
        )

    test_ds, val_ds = _eval_datasets(config, data)
    results = score(test_ds)
    if val_ds is not None:
        results.update({f"val_{k}": v for k, v in score(val_ds).items()})
    results.update(
        epochs=config["epochs"],
        train_seconds=None if train_seconds is None else round(train_seconds, 2),
        train_examples=len(data.train),
        method=config["method"],
        dataset=config["dataset"],
        backbone=config["backbone"],
        seed=config["seed"],
    )
    return results


def _warn_untested_classes(source, train, test):
    """Prints one warning line naming the training classes that the test split lacks."""
    train_labels, test_labels = getattr(train, "labels", None), getattr(test, "labels", None)
    if train_labels is None or test_labels is None:  # Streamed: not known before reading.
        return
    missing = sorted(set(train_labels.tolist()) - set(test_labels.tolist()))
    if not missing:
        return
    names = [
        repr(source.class_names[c]) if c < len(source.class_names) else str(c) for c in missing
    ]
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    kind = "class" if len(names) == 1 else "classes"
    tested = source.num_classes - len(missing)
    print(
        f"warning: the test split of '{source.name}' has no images of the {kind} "
        f"{', '.join(names[:5])}{more}: its test metrics are over the other {tested} of "
        f"{source.num_classes} classes.",
        file=sys.stderr,
    )


def _check_labels(split, num_classes, name, dataset):
    """Raises UserError if a split held in memory has labels outside [0, num_classes)."""
    labels = getattr(split, "labels", None)
    if labels is None or not len(labels):
        return
    low, high = int(labels.min()), int(labels.max())
    _check(
        0 <= low and high < num_classes,
        f"The {name} split of '{dataset}' has labels from {low} to {high}, outside the "
        f"{num_classes} classes [0, {num_classes - 1}].",
    )


def _check_writable(workdir):
    """Raises UserError unless files can be made in the run folder (or, for a new one, in the
    nearest folder above it that exists), and in its checkpoint folders."""
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top

    above = os.path.abspath(workdir)
    while not os.path.isdir(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    checkpoints = os.path.join(workdir, "checkpoints")
    inside = [checkpoints, os.path.join(checkpoints, checkpointing.RESUME_DIR)]
    for folder in [above, *filter(os.path.isdir, inside)]:
        try:
            # A name that the next start's clean-up removes, should this process die here.
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-write-test-")
            os.close(fd)
            os.remove(probe)
        except OSError as err:
            where = "" if folder == os.path.abspath(workdir) else f" (in {folder})"
            raise UserError(
                f"Cannot write to the run folder {workdir}{where}: {err.strerror or err}; pass "
                f"another --workdir, or make it writable."
            ) from None


class _Guard:
    """What stops a run, in one sentence: a stop signal, a file that cannot be written, a lost
    worker, an undecodable image. A new run that stops before its first checkpoint leaves no
    folder (whatever stopped it).

    Set `splits` once the data is loaded (to name an undecodable image) and
    `run_checkpoint` once training begins (to say where it stopped).
    """

    def __init__(self, config, store, stop, strategy, new):
        self.workdir = config["workdir"]
        self.store, self.stop, self.strategy = store, stop, strategy
        # A folder that existed (empty) before the run is emptied, not removed.
        self.new, self.existed = new, os.path.isdir(self.workdir)
        self.splits, self.run_checkpoint = [], None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None:
            return False
        converted = self._sentence(error)
        if self.new and self.store.latest() is None:
            self._remove_folder()
        if converted is not None:
            raise converted from error
        return False

    def stop_if_signalled(self, resumed):
        """Raises `Stopped` if a stop signal came before training began: nothing to save."""
        if self.stop.received is not None:
            raise cli_lib.Stopped(
                f"stopped by {self.stop.received} before training began; nothing was saved, "
                f"rerun the same command to {'resume' if resumed else 'start'}."
            )

    def _kept(self):
        state = self.store.read_state()
        if state is None:
            return "no checkpoint had been saved yet"
        at = (
            f"after epoch {state['epoch']}"
            if state["step"] == 0
            else f"at step {state['step']} of epoch {state['epoch'] + 1}"
        )
        return f"the last intact checkpoint is {self.store.latest()}, {at}"

    def _where(self):
        if self.run_checkpoint is None:
            return "before training began"
        done, steps = self.run_checkpoint.global_step, self.run_checkpoint.steps_per_epoch
        if done == 0:
            return "before its first step"
        epoch = (done - 1) // steps
        return f"after step {done - epoch * steps} of epoch {epoch + 1}"

    def _sentence(self, error):
        """The one-sentence exception that replaces `error`, or None to let it through."""
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top
        from cskd_tf import distributed  # pylint: disable=g-import-not-at-top
        from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top

        again = "rerun the same command"
        if isinstance(error, KeyboardInterrupt):  # A second Ctrl-C: the handler raised it.
            state = self.store.read_state()
            done = self.run_checkpoint.global_step if self.run_checkpoint else None
            unsaved = "" if state and state["global_step"] == done else ", unsaved"
            return cli_lib.Stopped(
                f"stopped at once by a second Ctrl-C {self._where()}{unsaved}; {self._kept()}: "
                f"{again} to {'resume' if state else 'start again'}."
            )
        if isinstance(error, checkpointing.WriteError):
            return cli_lib.Fault(
                f"Cannot write {error.path}: {error.reason}; {self._kept()}: free space or fix "
                f"the folder, then {again} to {'resume' if self.store.latest() else 'start'}."
            )
        task = distributed.lost_peer(error, self.strategy)
        if task is not None and distributed.is_multi_worker(self.strategy):
            return cli_lib.Fault(
                f"Lost {task} of the multi-worker job {self._where()}; {self._kept()}: "
                f"restart every worker with the same command."
            )
        if isinstance(error, tf.errors.InvalidArgumentError):
            if not any(word in str(error) for word in ("decode", "image", "JPEG", "PNG")):
                return None  # Not a decoding failure: no need to scan the data.
            splits = [split for split in self.splits if split is not None]
            bad = [f for split in splits for f in sources.unreadable(split)]
            if not bad:
                return None
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            return UserError(
                f"Cannot decode the image {bad[0]}{more}: remove or replace it, then rerun the "
                f"same command (an interrupted run resumes)."
            )
        return None

    def _remove_folder(self):
        import shutil  # pylint: disable=g-import-not-at-top

        if not self.existed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for name in os.listdir(self.workdir) if os.path.isdir(self.workdir) else ():
            path = os.path.join(self.workdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


# Flags that may change when a run resumes: where and how fast it runs, not what it computes.
_FREE_ON_RESUME = ("workdir", "data_dir", "jit_compile", "eval_every", "save_every_steps",
                   "strategy", "cpu_replicas", "deterministic", "run_eagerly")  # fmt: skip


def _run_folder(workdir, resolved):
    """What `workdir` holds: `new` (nothing yet), `resume` (this run, started) or `finished`.

    Raises:
      UserError: if it holds something else, or a run started with other flags.
    """
    if not os.path.isdir(workdir) or not os.listdir(workdir):
        _check(
            not os.path.exists(workdir) or os.path.isdir(workdir),
            f"--workdir={workdir} is a file, not a folder.",
        )
        return "new"
    flags_path = os.path.join(workdir, "flags.txt")
    _check(
        os.path.isfile(flags_path),
        f"The folder {workdir} is not empty and is not a run folder (no flags.txt): pass "
        f"another --workdir or remove it.",
    )
    previous = read_flagfile(flags_path)
    changed = [
        name
        for name, value in resolved.items()
        if name not in _FREE_ON_RESUME and str(previous.get(name)) != str(value)
    ]
    _check(
        not changed,
        f"The run folder {workdir} was started with "
        + ", ".join(f"--{n}={previous.get(n)}" for n in changed)
        + ", not "
        + ", ".join(f"--{n}={resolved[n]}" for n in changed)
        + f": rerun with --flagfile={flags_path} to resume it, or pass another --workdir.",
    )
    return "finished" if os.path.isfile(os.path.join(workdir, "metrics.json")) else "resume"


def read_flagfile(path):
    """The flags of a run folder's `flags.txt` (or any flagfile), as `run`'s keyword arguments.

    Every training flag, and the flags of the file's method (the defaults where the file
    leaves them out).

    Raises:
      UserError: if the file is missing or holds an unknown flag.
    """
    _check(os.path.isfile(path), f"{path} does not exist: is this a run folder of cskd_tf.train?")
    values = flags.FlagValues()
    holders = define_flags(values)
    try:
        values(["train", f"--flagfile={path}"])
    except flags.Error as err:
        raise UserError(f"Cannot read {path}: {err}") from None
    return _own_flags({name: holder.value for name, holder in holders.items()})


def _write_flagfile(path, values):
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top

    lines = [f"# Resolved flags of this run: python -m cskd_tf.train --flagfile={path}"]
    for name, value in values.items():
        if value is not None:
            lines.append(f"--{name}={value}")
    checkpointing.atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv):
    cli_lib.no_arguments(argv)
    result = run(**{name: flag.value for name, flag in _FLAGS.items()})
    if result["metrics"] is None:  # A worker of a multi-worker run: the chief reports.
        print("This worker is done; the chief wrote the run folder.")
        return
    if result["resumed"] == "finished":  # run() said so.
        return
    print(
        f"Wrote {result['workdir']}/metrics.json: "
        + ", ".join(
            f"{k}={result['metrics'][k]:.4f}"
            for k in ("top1_error", "top5_error", "ece", "recall_at_1")
        )
    )


def cli():
    _FLAGS.update(define_flags())
    cli_lib.run(main)


if __name__ == "__main__":
    cli()
