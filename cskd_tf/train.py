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
"""

import contextlib
import json
import math
import os
import sys
import time

from absl import flags

from cskd_tf import cli as cli_lib
from cskd_tf.errors import UserError

# Method -> what it trains with: same-class pairs, the clean view (CS-KD-E),
# Mixup, a teacher (KD). Every method's cross-entropy takes --label_smoothing
# and --entropy_weight; the two baselines of those names only change their defaults.
METHODS = {
    "ce": dict(),
    "cskd": dict(pairs=True),
    "label_smoothing": dict(),
    "max_entropy": dict(),
    "mixup": dict(mixup=True),
    "mixup_cskd": dict(pairs=True, mixup=True),
    "cskd_e": dict(pairs=True, clean=True),
    "cskd_sam": dict(pairs=True, clean=True, sample_form="iclr"),
    "kd": dict(teacher=True),
    "kd_cskd": dict(pairs=True, teacher=True),
    "adacos": dict(head="adacos"),
    "virtual_softmax": dict(head="virtual_softmax"),
    # Two augmented views of each image (the "partner" is the anchor itself).
    "ddgsd": dict(pairs=True, partner="self", model="ddgsd"),
    "byot": dict(model="byot"),
}
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
    """Defines the training flags on `flag_values`; returns them by name."""
    fv = dict(flag_values=flag_values)
    string = lambda *a: flags.DEFINE_string(*a, **fv)
    integer = lambda *a: flags.DEFINE_integer(*a, **fv)
    real = lambda *a: flags.DEFINE_float(*a, **fv)
    return dict(
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
            list(METHODS),
            "Training objective: ce, cskd, label_smoothing, max_entropy (confidence penalty), "
            "mixup, mixup_cskd, cskd_e (CS-KD + the CVPR paper's sample-wise term), cskd_sam "
            "(+ the ICLR submission's L_sam), kd, kd_cskd (with --teacher), adacos, "
            "virtual_softmax, ddgsd, byot.",
            **fv,
        ),
        temperature=real("temperature", 4.0, "CS-KD temperature T."),
        lambda_cls=real("lambda_cls", 1.0, "Weight of the class-wise term."),
        lambda_sample=real(
            "lambda_sample",
            1.0,
            "cskd_e, cskd_sam: weight (lambda_E, lambda_sam) of the sample-wise term.",
        ),
        label_smoothing=real(
            "label_smoothing",
            None,
            "Label smoothing of the cross-entropy; unset: 0.1 for "
            "--method=label_smoothing, else 0.",
        ),
        entropy_weight=real(
            "entropy_weight",
            None,
            "Confidence penalty beta (CE - beta * entropy); unset: 0.1 "
            "for --method=max_entropy, else 0.",
        ),
        mixup_alpha=real("mixup_alpha", 1.0, "mixup, mixup_cskd: Beta(alpha, alpha) of Mixup."),
        teacher=string(
            "teacher",
            None,
            "kd, kd_cskd: the teacher, a run folder, an export folder or a .keras file.",
        ),
        kd_alpha=real("kd_alpha", 0.9, "kd, kd_cskd: weight of distillation (CE gets 1 - alpha)."),
        kd_temperature=real("kd_temperature", 4.0, "kd, kd_cskd: distillation temperature."),
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


def run(
    dataset="digits",
    data_dir=None,
    backbone=None,
    method="cskd",
    temperature=4.0,
    lambda_cls=1.0,
    lambda_sample=1.0,
    label_smoothing=None,
    entropy_weight=None,
    mixup_alpha=1.0,
    teacher=None,
    kd_alpha=0.9,
    kd_temperature=4.0,
    epochs=None,
    batch_size=None,
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    val_split=0.0,
    eval_every=1,
    jit_compile=None,
    mixed_precision="none",
    strategy="auto",
    cpu_replicas=0,
    seed=0,
    deterministic=False,
    save_every_steps=500,
    run_eagerly=False,
    workdir=None,
    verbose=None,
):
    """Trains, evaluates on the test split and writes the run folder.

    Args: as the flags of the same names; `verbose` is Keras' (None: a
    progress bar on a terminal, one line per epoch otherwise).

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
    # Imported here so that `--help` and flag errors answer at once.
    import keras  # pylint: disable=g-import-not-at-top

    import cskd_tf  # pylint: disable=g-import-not-at-top
    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top
    from cskd_tf import checkpointing  # pylint: disable=g-import-not-at-top
    from cskd_tf import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top
    from cskd_tf import distributed  # pylint: disable=g-import-not-at-top
    from cskd_tf import losses  # pylint: disable=g-import-not-at-top
    from cskd_tf.data import mixup as mixup_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top
    from cskd_tf import heads  # pylint: disable=g-import-not-at-top
    from cskd_tf.model import Classifier  # pylint: disable=g-import-not-at-top
    from cskd_tf.model import CSKDModel  # pylint: disable=g-import-not-at-top
    from cskd_tf.model import HeadModel  # pylint: disable=g-import-not-at-top
    from cskd_tf import saving  # pylint: disable=g-import-not-at-top
    from cskd_tf.byot import BYOTModel  # pylint: disable=g-import-not-at-top
    from cskd_tf.ddgsd import DDGSDModel  # pylint: disable=g-import-not-at-top
    from cskd_tf.optim import CoupledWeightDecaySGD, step_schedule  # pylint: disable=g-import-not-at-top

    # --- Arguments -------------------------------------------------------------
    dataset = sources.ALIASES.get(dataset, dataset)
    _check(
        dataset in sources.names(),
        f"Unknown data set '{dataset}'. Choose one of: {', '.join(sources.names())}.",
    )
    _check(method in METHODS, f"Unknown method '{method}'. Choose one of: {', '.join(METHODS)}.")
    defaults = DEFAULTS[dataset]
    backbone = backbone or defaults["backbone"]
    epochs = epochs or defaults["epochs"]
    batch_size = batch_size or defaults["batch_size"]
    _check(
        backbone in backbones.names(),
        f"Unknown backbone '{backbone}'. Choose one of: {', '.join(backbones.names())}.",
    )
    _check(temperature > 0, f"--temperature must be > 0, got {temperature}.")
    _check(lambda_cls >= 0, f"--lambda_cls must be >= 0, got {lambda_cls}.")
    _check(lambda_sample >= 0, f"--lambda_sample must be >= 0, got {lambda_sample}.")
    needs = METHODS[method]
    if label_smoothing is None:
        label_smoothing = 0.1 if method == "label_smoothing" else 0.0
    if entropy_weight is None:
        entropy_weight = 0.1 if method == "max_entropy" else 0.0
    _check(
        0 <= label_smoothing <= 1, f"--label_smoothing must be in [0, 1], got {label_smoothing}."
    )
    _check(entropy_weight >= 0, f"--entropy_weight must be >= 0, got {entropy_weight}.")
    _check(mixup_alpha > 0, f"--mixup_alpha must be > 0, got {mixup_alpha}.")
    _check(0 <= kd_alpha <= 1, f"--kd_alpha must be in [0, 1], got {kd_alpha}.")
    _check(kd_temperature > 0, f"--kd_temperature must be > 0, got {kd_temperature}.")
    _check(
        bool(teacher) == bool(needs.get("teacher")),
        f"--method={method} needs --teacher (a run folder, export folder or .keras file)."
        if needs.get("teacher")
        else f"--teacher is only used by --method=kd or kd_cskd, not {method}.",
    )
    if teacher:
        teacher = _teacher_file(teacher)
    _check(epochs >= 1, f"--epochs must be >= 1, got {epochs}.")
    _check(batch_size >= 1, f"--batch_size must be >= 1, got {batch_size}.")
    _check(lr > 0, f"--lr must be > 0, got {lr}.")
    _check(0 <= val_split < 1, f"--val_split must be in [0, 1), got {val_split}.")
    _check(weight_decay >= 0, f"--weight_decay must be >= 0, got {weight_decay}.")
    _check(eval_every >= 0, f"--eval_every must be >= 0, got {eval_every}.")
    _check(save_every_steps >= 0, f"--save_every_steps must be >= 0, got {save_every_steps}.")
    _check(cpu_replicas >= 0, f"--cpu_replicas must be >= 0, got {cpu_replicas}.")
    _check(
        mixed_precision in PRECISIONS,
        f"Unknown --mixed_precision '{mixed_precision}'. Choose one of: {', '.join(PRECISIONS)}.",
    )
    # Before any TensorFlow op: a multi-worker strategy must configure the runtime first.
    strategy_name, strategy = strategy, distributed.make_strategy(strategy, cpu_replicas)
    chief = distributed.is_chief(strategy)
    workdir = workdir or os.path.join("runs", f"{dataset}-{method}-s{seed}")
    resolved = dict(
        dataset=dataset,
        data_dir=data_dir,
        backbone=backbone,
        method=method,
        temperature=temperature,
        lambda_cls=lambda_cls,
        lambda_sample=lambda_sample,
        label_smoothing=label_smoothing,
        entropy_weight=entropy_weight,
        mixup_alpha=mixup_alpha,
        teacher=teacher,
        kd_alpha=kd_alpha,
        kd_temperature=kd_temperature,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        val_split=val_split,
        eval_every=eval_every,
        jit_compile=jit_compile,
        mixed_precision=mixed_precision,
        strategy=strategy_name,
        cpu_replicas=cpu_replicas,
        seed=seed,
        deterministic=deterministic,
        save_every_steps=save_every_steps,
        run_eagerly=run_eagerly,
        workdir=workdir,
    )
    folder = _run_folder(workdir, resolved) if chief else "new"
    if folder == "finished":
        print(f"{workdir} is a finished run (metrics.json): nothing to do.")
        with open(os.path.join(workdir, "metrics.json")) as f:
            results = json.load(f)
        return dict(history=None, metrics=results, workdir=workdir, model=None, resumed="finished")
    store = checkpointing.ResumeStore(os.path.join(workdir, "checkpoints"))
    state = store.read_state() if folder == "resume" or not chief else None
    keras.utils.set_random_seed(seed)
    if deterministic:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        tf.config.experimental.enable_op_determinism()

    # --- Data ------------------------------------------------------------------
    source = data.load(dataset, data_dir)
    train, test = source.train, source.test
    val = None
    if val_split > 0:
        _check(
            isinstance(train, sources.Split),
            f"--val_split needs random access to the training set, which the "
            f"streamed data set '{dataset}' lacks.",
        )
        train, val = data.stratified_split(train, val_split, seed=seed)
    _check(
        batch_size <= len(train),
        f"--batch_size {batch_size} is larger than the {len(train)} training examples.",
    )
    for name, split in (("training", train), ("test", test), ("validation", val)):
        _check_labels(split, source.num_classes, name, dataset)
    augmenter = data.Augmenter(source.preset, seed=seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    streamed = not isinstance(train, sources.Split)
    _check(
        not (streamed and needs.get("clean")),
        f"--method={method} needs the clean view of each anchor, which the streamed "
        f"data set '{dataset}' does not provide.",
    )
    _check(
        not (streamed and needs.get("partner")),
        f"--method={method} needs two views of each image, which the streamed data set "
        f"'{dataset}' does not provide.",
    )

    def train_batches(epoch_range, skip):
        """The training batches of the epochs in `epoch_range`, less `skip` of the first."""
        common = dict(seed=seed, augment=augmenter.train, epochs=epoch_range, skip=skip)
        if needs.get("pairs") and streamed:
            ds = data.stream_pair_dataset(train.make(), batch_size, kind=train.kind, **common)
        elif needs.get("pairs"):
            ds = data.pair_dataset(
                train.values,
                train.labels,
                batch_size,
                kind=train.kind,
                clean=augmenter.eval if needs.get("clean") else None,
                partner=needs.get("partner", "class"),
                **common,
            )
        else:
            ds = data.split_dataset(train, batch_size, shuffle=True, **common)
        if needs.get("mixup"):
            first = epoch_range.start * steps_per_epoch + skip
            ds = mixup_lib.mixup(
                ds, source.num_classes, alpha=mixup_alpha, seed=seed, first_batch=first
            )
        return ds

    test_ds = data.split_dataset(test, batch_size, augment=augmenter.eval)
    val_ds = (
        data.split_dataset(val, batch_size, augment=augmenter.eval)
        if val is not None and len(val)
        else None
    )

    # --- Model -----------------------------------------------------------------
    with strategy.scope(), _dtype_policy(mixed_precision):
        net = backbones.get(backbone, source.num_classes, augmenter.input_shape)
        teacher_model = None
        if teacher:
            teacher_model = saving.load_model(teacher)
            teacher_model = callbacks_lib.classifier_of(teacher_model)
            _check(
                tuple(teacher_model.output.shape[1:]) == (source.num_classes,)
                and tuple(teacher_model.input.shape[1:]) == tuple(augmenter.input_shape),
                f"The teacher {teacher} maps {teacher_model.input.shape[1:]} to "
                f"{teacher_model.output.shape[1:]}, but '{dataset}' needs "
                f"{augmenter.input_shape} to ({source.num_classes},).",
            )
        if needs.get("model") == "ddgsd":
            model = DDGSDModel(net, temperature=temperature)
        elif needs.get("model") == "byot":
            try:
                model = BYOTModel(net)
            except ValueError as err:  # A backbone without stages (the MLP).
                raise UserError(f"--method=byot cannot use --backbone={backbone}: {err}") from None
        elif needs.get("pairs") or teacher_model is not None:
            model = CSKDModel(
                net,
                temperature=temperature,
                lambda_cls=lambda_cls if needs.get("pairs") else 0.0,
                lambda_sample=lambda_sample if needs.get("clean") else 0.0,
                sample_form=needs.get("sample_form", "cvpr"),
                teacher=teacher_model,
                kd_alpha=kd_alpha if teacher_model is not None else 0.0,
                kd_temperature=kd_temperature,
            )
        elif needs.get("head"):
            try:
                head = heads.get(needs["head"], source.num_classes)
            except ValueError as err:  # AdaCos' scale needs three classes or more.
                raise UserError(f"--method={method} on '{dataset}': {err}") from None
            model = HeadModel(net, head)
        else:
            model = Classifier(net)

        # --- Compile -------------------------------------------------------------
        schedule = step_schedule(lr, epochs, steps_per_epoch)
        model.compile(
            optimizer=CoupledWeightDecaySGD(
                schedule, momentum=momentum, coupled_weight_decay=weight_decay
            ),
            loss=losses.ClassificationLoss(label_smoothing, entropy_weight),
            metrics=[
                # Mixup's labels are soft: accuracy against their larger share.
                keras.metrics.CategoricalAccuracy(name="accuracy")
                if needs.get("mixup")
                else keras.metrics.SparseCategoricalAccuracy(name="accuracy")
            ],
            jit_compile="auto" if jit_compile is None else jit_compile,
            run_eagerly=run_eagerly,
        )

        # --- Resume ------------------------------------------------------------
        if state is not None:
            _check(
                state.get("format") == checkpointing.FORMAT,
                f"The run folder {workdir} was started by cskd_tf {state.get('version', '0.1')}, "
                f"whose training computed batch-norm and the pass order differently; this "
                f"version cannot continue it: finish it with that version, or pass another "
                f"--workdir.",
            )
            _check(
                state.get("num_classes") == source.num_classes,
                f"The run folder {workdir} was trained on {state.get('num_classes')} classes, "
                f"but '{dataset}' now has {source.num_classes}: pass another --workdir.",
            )
            try:
                store.restore(model)
            except (ValueError, OSError) as err:
                raise UserError(
                    f"The checkpoint in {store.latest()} does not fit this model ({err}); "
                    f"pass another --workdir."
                ) from None
    first_epoch, first_step = (state["epoch"], state["step"]) if state else (0, 0)

    # --- Callbacks -------------------------------------------------------------
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    monitor = "val_top1_error" if val_ds is not None and eval_every else None
    checkpoints = os.path.join(workdir, "checkpoints")
    run_checkpoint = checkpointing.RunCheckpoint(
        checkpoints,
        steps_per_epoch,
        every_steps=save_every_steps,
        state=state,
        monitor=monitor,
        info=dict(
            num_classes=source.num_classes,
            dataset=dataset,
            backbone=backbone,
            format=checkpointing.FORMAT,
            version=cskd_tf.__version__,
        ),
        save=chief,
    )
    callbacks = []
    if eval_every and chief:
        # Before the checkpoints and loggers, so that they see its metrics.
        monitored, prefix = (val_ds, "val_") if val_ds is not None else (test_ds, "test_")
        callbacks.append(callbacks_lib.EvaluationCallback(monitored, eval_every, prefix))
    callbacks.append(run_checkpoint)
    if chief:
        # Everything is validated: only now does the run folder appear.
        os.makedirs(checkpoints, exist_ok=True)
        store.clean()  # What a killed save may have left.
        flags_path = os.path.join(workdir, "flags.txt")
        if not os.path.isfile(flags_path):
            _write_flagfile(flags_path, resolved)
        callbacks.append(
            keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard"), profile_batch=0)
        )

    created = chief and folder == "new"
    with _on_failure(workdir if created else None, store, [train, test, val]):
        # --- Fit -------------------------------------------------------------------
        start = time.time()
        # The validation split is scored by the EvaluationCallback (one pass for
        # every metric), not by Keras' own validation loop. An epoch interrupted
        # midway is finished first, on its own, then the remaining epochs.
        parts = [(first_epoch, first_epoch + 1, first_step)] if first_step else []
        parts.append((first_epoch + bool(first_step), epochs, 0))
        for begin, end, skip in parts:
            if begin >= end or run_checkpoint.diverged_at is not None:
                continue
            batches = train_batches(range(begin, end), skip)
            if distributed.is_multi_worker(strategy):  # Keras 3.15's fit fails there (#20585).
                distributed.fit_multi_worker(
                    model,
                    batches,
                    end,
                    callbacks,
                    verbose if chief else 0,
                    initial_epoch=begin,
                    steps_per_epoch=steps_per_epoch - skip,
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
        if chief and first_epoch >= epochs:  # Killed between the last epoch's two saves.
            checkpointing.atomic_save_model(model, os.path.join(checkpoints, "last.keras"))
        if run_checkpoint.diverged_at is not None:
            step, good = run_checkpoint.diverged_at, store.read_state()
            kept = (
                f"the last good checkpoint (step {good['global_step']}) is in {checkpoints}"
                if good
                else "no checkpoint had been saved yet"
            )
            raise FloatingPointError(
                f"The training loss became NaN or infinite at step {step} (epoch "
                f"{(step - 1) // steps_per_epoch + 1}); {kept} (lower --lr or check the data)."
            )
        history = {k: [epoch.get(k) for epoch in run_checkpoint.history]
                   for k in run_checkpoint.history[-1]}  # fmt: skip
        if not chief:  # Another worker: trained in step with the chief, writes nothing.
            return dict(history=history, metrics=None, workdir=None, model=model, resumed=None)

        # --- Evaluate --------------------------------------------------------------
        # Last-epoch figures on the test split, as REFERENCE.md asks: nothing here
        # is selected on the test set.
        predictor = callbacks_lib.Predictor(model)

        def score(dataset):
            out = predictor(dataset)
            return metrics_lib.classification_metrics(
                out.logits,
                out.labels,
                features=out.features,
                groups=source.groups,
                group_names=source.group_names,
            )

        results = score(test_ds)
        if val_ds is not None:
            results.update({f"val_{k}": v for k, v in score(val_ds).items()})
        results.update(
            epochs=epochs,
            train_seconds=round(train_seconds, 2) if state is None else None,
            train_examples=len(train),
            method=method,
            dataset=dataset,
            backbone=backbone,
            seed=seed,
        )

        # --- Save ------------------------------------------------------------------
        # Written last, and atomically: its presence marks the run finished.
        checkpointing.atomic_write_text(
            os.path.join(workdir, "metrics.json"), json.dumps(results, indent=2, sort_keys=True)
        )
        resumed = state["global_step"] if state else None
        return dict(history=history, metrics=results, workdir=workdir, model=model, resumed=resumed)


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


@contextlib.contextmanager
def _on_failure(new_workdir, store, splits):
    """Turns an undecodable image into a UserError naming it; removes a new run's folder if
    training stops on a user error or divergence before its first checkpoint."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top

    try:
        try:
            yield
        except tf.errors.InvalidArgumentError as err:
            if not any(word in str(err) for word in ("decode", "image", "JPEG", "PNG")):
                raise  # Not a decoding failure: no need to scan the data.
            bad = [f for split in splits if split is not None for f in sources.unreadable(split)]
            if not bad:
                raise
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(
                f"Cannot decode the image {bad[0]}{more}: remove or replace it, then rerun the "
                f"same command (an interrupted run resumes)."
            ) from err
    except (UserError, FloatingPointError):
        if new_workdir is not None and store.latest() is None:
            import shutil  # pylint: disable=g-import-not-at-top

            shutil.rmtree(new_workdir, ignore_errors=True)
        raise


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
    return {name: holder.value for name, holder in holders.items()}


def _write_flagfile(path, values):
    lines = [f"# Resolved flags of this run: python -m cskd_tf.train --flagfile={path}"]
    for name, value in values.items():
        if value is not None:
            lines.append(f"--{name}={value}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    cli_lib.no_arguments(argv)
    values = {name: flag.value for name, flag in _FLAGS.items()}
    result = run(**values)
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
