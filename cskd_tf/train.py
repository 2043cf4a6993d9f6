r"""Trains a classifier with CS-KD or cross-entropy and evaluates it.

    python -m cskd_tf.train                               # offline digits demo
    python -m cskd_tf.train --flagfile=configs/cub.flags  # a paper experiment

The run folder (`--workdir`) receives `flags.txt` (rerun with
`--flagfile=WORKDIR/flags.txt`), TensorBoard logs, `history.csv`,
checkpoints and `metrics.json` (test top-1 / top-5 error, NLL, ECE, AURC and
recall@1, fractions). Every `--eval_every` epochs the same metrics of the
validation split (`val_*`; or, without one, of the test split as `test_*`, for
curves only: nothing is selected on them) go into the history and TensorBoard.
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
    "kd": dict(teacher=True),
    "kd_cskd": dict(pairs=True, teacher=True),
    "adacos": dict(head="adacos"),
    "virtual_softmax": dict(head="virtual_softmax"),
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
            "tiny_imagenet, mit67, folder (image folders).",
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
            "mixup, mixup_cskd, cskd_e (CS-KD + sample-wise term), kd, kd_cskd (with --teacher), "
            "adacos, virtual_softmax.",
            **fv,
        ),
        temperature=real("temperature", 4.0, "CS-KD temperature T."),
        lambda_cls=real("lambda_cls", 1.0, "Weight of the class-wise term."),
        lambda_sample=real(
            "lambda_sample", 1.0, "cskd_e: weight lambda_E of the sample-wise term."
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
        seed=integer("seed", 0, "Random seed (weights, sampler, augmentation)."),
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
    seed=0,
    workdir=None,
    verbose=None,
):
    """Trains, evaluates on the test split and writes the run folder.

    Args: as the flags of the same names; `verbose` is Keras' (None: a
    progress bar on a terminal, one line per epoch otherwise).

    Under `strategy="multi_worker"` every worker runs this function; only the
    chief validates and writes the run folder and evaluates.

    Returns:
      dict with `history` (Keras' per-epoch logs), `metrics` (what
      `metrics.json` holds; None on a worker that is not the chief),
      `workdir` and `model`.
    """
    # Imported here so that `--help` and flag errors answer at once.
    import keras  # pylint: disable=g-import-not-at-top

    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top
    from cskd_tf import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top
    from cskd_tf import distributed  # pylint: disable=g-import-not-at-top
    from cskd_tf import losses  # pylint: disable=g-import-not-at-top
    from cskd_tf.data import mixup as mixup_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    from cskd_tf.data import sources  # pylint: disable=g-import-not-at-top
    from cskd_tf import heads  # pylint: disable=g-import-not-at-top
    from cskd_tf.model import CSKDModel  # pylint: disable=g-import-not-at-top
    from cskd_tf.model import HeadModel  # pylint: disable=g-import-not-at-top
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
    _check(
        mixed_precision in PRECISIONS,
        f"Unknown --mixed_precision '{mixed_precision}'. Choose one of: {', '.join(PRECISIONS)}.",
    )
    # Before any TensorFlow op: a multi-worker strategy must configure the runtime first.
    strategy_name, strategy = strategy, distributed.make_strategy(strategy)
    chief = distributed.is_chief(strategy)
    workdir = workdir or os.path.join("runs", f"{dataset}-{method}-s{seed}")
    _check(
        not chief or not (os.path.isdir(workdir) and os.listdir(workdir)),
        f"The run folder {workdir} already exists and is not empty: pass "
        f"another --workdir or remove it.",
    )
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
        seed=seed,
        workdir=workdir,
    )
    keras.utils.set_random_seed(seed)

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
    augmenter = data.Augmenter(source.preset, seed=seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    if needs.get("pairs"):
        if isinstance(train, sources.Split):
            train_ds = data.pair_dataset(
                train.values,
                train.labels,
                batch_size,
                seed=seed,
                kind=train.kind,
                augment=augmenter.train,
                clean=augmenter.eval if needs.get("clean") else None,
            )
        else:
            _check(
                not needs.get("clean"),
                f"--method={method} needs the clean view of each anchor, which the streamed "
                f"data set '{dataset}' does not provide.",
            )
            train_ds = data.stream_pair_dataset(
                train.make(), batch_size, seed=seed, kind=train.kind, augment=augmenter.train
            )
    else:
        train_ds = data.split_dataset(
            train, batch_size, seed=seed, augment=augmenter.train, shuffle=True
        )
    if needs.get("mixup"):
        train_ds = mixup_lib.mixup(train_ds, source.num_classes, alpha=mixup_alpha, seed=seed)
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
            teacher_model = keras.models.load_model(teacher, compile=False)
            teacher_model = callbacks_lib.classifier_of(teacher_model)
            _check(
                tuple(teacher_model.output.shape[1:]) == (source.num_classes,)
                and tuple(teacher_model.input.shape[1:]) == tuple(augmenter.input_shape),
                f"The teacher {teacher} maps {teacher_model.input.shape[1:]} to "
                f"{teacher_model.output.shape[1:]}, but '{dataset}' needs "
                f"{augmenter.input_shape} to ({source.num_classes},).",
            )
        if needs.get("pairs") or teacher_model is not None:
            model = CSKDModel(
                net,
                temperature=temperature,
                lambda_cls=lambda_cls if needs.get("pairs") else 0.0,
                lambda_sample=lambda_sample if needs.get("clean") else 0.0,
                teacher=teacher_model,
                kd_alpha=kd_alpha if teacher_model is not None else 0.0,
                kd_temperature=kd_temperature,
            )
        elif needs.get("head"):
            model = HeadModel(net, heads.get(needs["head"], source.num_classes))
        else:
            model = net

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
        )

    # --- Callbacks -------------------------------------------------------------
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    if not chief:  # Another worker: trains in step with the chief, writes nothing.
        history = distributed.fit_multi_worker(
            model, train_ds, epochs, [keras.callbacks.TerminateOnNaN()], verbose=0
        )
        _check_finite(history.history, epochs, "the chief's run folder")
        return dict(history=history.history, metrics=None, workdir=None, model=model)
    # Everything is validated: only now does the run folder appear.
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    _write_flagfile(os.path.join(workdir, "flags.txt"), resolved)
    callbacks = []
    if eval_every:
        # First in the list, so that the checkpoints and loggers below see its metrics.
        monitored, prefix = (val_ds, "val_") if val_ds is not None else (test_ds, "test_")
        callbacks.append(callbacks_lib.EvaluationCallback(monitored, eval_every, prefix))
    callbacks += [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv")),
        keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard"), profile_batch=0),
        keras.callbacks.ModelCheckpoint(os.path.join(workdir, "checkpoints", "last.keras")),
    ]
    if val_ds is not None and eval_every:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                os.path.join(workdir, "checkpoints", "best.keras"),
                monitor="val_top1_error",
                mode="min",
                save_best_only=True,
            )
        )

    # --- Fit -------------------------------------------------------------------
    start = time.time()
    # The validation split is scored by the EvaluationCallback (one pass for
    # every metric), not by Keras' own validation loop.
    if distributed.is_multi_worker(strategy):  # Keras 3.15's fit fails there (#20585).
        history = distributed.fit_multi_worker(model, train_ds, epochs, callbacks, verbose)
    else:
        history = model.fit(
            train_ds, epochs=epochs, shuffle=False, callbacks=callbacks, verbose=verbose
        )
    train_seconds = time.time() - start
    _check_finite(history.history, epochs, f"{workdir}/checkpoints")

    # --- Evaluate --------------------------------------------------------------
    # Last-epoch figures on the test split, as REFERENCE.md asks: nothing here
    # is selected on the test set.
    predictor = callbacks_lib.Predictor(model)

    def score(dataset):
        out = predictor(dataset)
        return metrics_lib.classification_metrics(out.logits, out.labels, features=out.features)

    results = score(test_ds)
    if val_ds is not None:
        results.update({f"val_{k}": v for k, v in score(val_ds).items()})
    results.update(
        epochs=epochs,
        train_seconds=round(train_seconds, 2),
        train_examples=len(train),
        method=method,
        dataset=dataset,
        backbone=backbone,
        seed=seed,
    )

    # --- Save ------------------------------------------------------------------
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return dict(history=history.history, metrics=results, workdir=workdir, model=model)


def _check_finite(history, epochs, checkpoints):
    import numpy as np  # pylint: disable=g-import-not-at-top

    losses = history.get("loss", [])
    if len(losses) < epochs or not np.all(np.isfinite(losses)):
        raise FloatingPointError(
            f"The training loss became NaN or infinite in epoch {len(losses)}; "
            f"the last good checkpoint is in {checkpoints}."
        )


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
