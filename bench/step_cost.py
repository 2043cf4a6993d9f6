r"""Cost of one CS-KD train step relative to one cross-entropy step, same backbone and batch.

    python bench/step_cost.py                              # the four default cases
    python bench/step_cost.py --json=bench/results/step_cost.json
    python bench/step_cost.py --jit=off --repeats=3        # quicker
    python bench/step_cost.py --profile                    # + where the CS-KD step's time goes

CS-KD adds a forward pass over the partners, outside the gradient tape, to the
cross-entropy step: about 1 + 1/3 of its cost if a backward pass costs twice a
forward. The alternative, one forward and backward over `concat([x, x_pair])`
with the partner half's logits stop-gradient'ed, back-propagates through twice
the batch (the partner rows receive zero gradients, but the convolutions still
process them): about 2x. Both are timed here beside plain cross-entropy.

Two more contenders price choices of the package: the same CS-KD step with
Keras' own `BatchNormalization` in place of every `TorchBatchNormalization`
(PyTorch's moving-variance update, the package's default), and the CS-KD step
under the `mixed_bfloat16` policy, built as `cskd_tf.train` builds it with
`--mixed_precision=mixed_bfloat16`.

Each contender is Keras' own compiled train function (`model.train_function`,
what `fit` runs per step), called on one batch already in memory, so neither
Python data handling nor tf.data is in the time.
"""

import dataclasses
import os
import pathlib
import sys

if __package__ in (None, ""):
    # Run as `python bench/step_cost.py`: make `bench` importable from the repository root.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from bench import common
from cskd_tf import backbones
from cskd_tf import losses
from cskd_tf import train as train_lib
from cskd_tf.backbones.layers import TorchBatchNormalization
from cskd_tf.model import CSKDModel
from cskd_tf.optim import CoupledWeightDecaySGD

TARGET_RATIO = 1.35
VARIANTS = ("ce", "cskd", "concat_2b", "cskd_keras_bn", "cskd_bf16")
# The ratios reported, each under `ratio_<name>` in a row: name -> (numerator, denominator).
# Taken only when both variants were timed.
RATIOS = {
    "cskd": ("cskd", "ce"),
    "concat_2b": ("concat_2b", "ce"),
    # Does PyTorch's moving-variance update cost anything? (The claim: no.)
    "torch_bn_over_keras_bn": ("cskd", "cskd_keras_bn"),
    # What bfloat16 buys on this CPU (> 1: bfloat16 is faster).
    "float32_over_bfloat16": ("cskd", "cskd_bf16"),
}
RATIO_LABELS = {
    "cskd": "cskd / ce",
    "concat_2b": "concat_2b / ce",
    "torch_bn_over_keras_bn": "torch BN / Keras BN",
    "float32_over_bfloat16": "float32 / bf16",
}
# The policy of each variant's layers: `cskd_tf.train`'s --mixed_precision value.
PRECISION = {"cskd_bf16": "mixed_bfloat16"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One backbone at one input size.

    Attributes:
      backbone: str. A `cskd_tf.backbones` name.
      input_shape: tuple. (height, width, channels).
      batch_size: int. Anchors per step.
      num_classes: int. Width of the logits.
    """

    backbone: str
    input_shape: tuple
    batch_size: int
    num_classes: int = 100

    @property
    def label(self):
        return f"{self.backbone} @{self.input_shape[0]}"


def default_cases(batch_size_32=32, batch_size_224=8):
    """The issue's two cases: PreAct ResNet-18 on CIFAR-size inputs, ResNet-18 on ImageNet-size."""
    return [
        Case("preact_resnet18", (32, 32, 3), batch_size_32, num_classes=100),
        Case("resnet18", (224, 224, 3), batch_size_224, num_classes=200),
    ]


class Concat2BModel(CSKDModel):
    """The design CS-KD avoids: one forward and backward over anchors and partners together.

    The partners' logits are a fixed target (`class_wise_kl` stops their
    gradient), so the loss is CS-KD's; but back-propagation still runs through
    all `2B` rows of every layer. Kept here only as a cost reference point. Its
    batch-norm statistics also differ (one batch of `2B`), which does not
    matter for timing.

    Reference: Yun et al., CVPR 2020, Algorithm 1 (the objective is unchanged).
    """

    def compute_objective(self, x, y, sample_weight):
        x, x_pair = x
        batch = tf.shape(x)[0]
        both = self(tf.concat([x, x_pair], axis=0), training=True)
        logits, pair_logits = both[:batch], both[batch:]
        ce = self._compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True)
        cls = tf.reduce_mean(losses.class_wise_kl(logits, pair_logits, self.temperature))
        loss = ce + self.lambda_cls * cls
        return dict(loss=loss, parts={"ce_loss": ce, "cls_loss": cls}, logits=logits)


def _compiled(model, jit_compile):
    # The demo's optimizer and metric; a small rate, since the same batch is
    # stepped on many times and only the cost matters.
    model.compile(
        optimizer=CoupledWeightDecaySGD(0.01, momentum=0.9, coupled_weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )
    return model


def random_batch(case, seed=0):
    """Anchors, partners and labels of one batch, as tensors in memory."""
    rng = np.random.default_rng(seed)
    shape = (case.batch_size, *case.input_shape)
    x = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    x_pair = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    y = tf.constant(rng.integers(0, case.num_classes, case.batch_size), tf.int64)
    return x, x_pair, y


def with_keras_batch_norm(backbone):
    """A copy of `backbone` with Keras' `BatchNormalization` for every `TorchBatchNormalization`.

    Each batch-norm is rebuilt from its own config (same momentum, epsilon,
    initialisers, name) and every weight is copied, so the copy computes the
    same outputs in inference and in training mode; only the update of the
    moving variance differs (Keras' biased batch variance against PyTorch's
    unbiased one).

    Args:
      backbone: keras.Model. A functional `cskd_tf.backbones` model.

    Returns:
      keras.Model. A new functional model sharing nothing with `backbone`.
    """

    def clone(layer):
        if isinstance(layer, TorchBatchNormalization):
            return keras.layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(backbone, clone_function=clone, recursive=True)
    copy.set_weights(backbone.get_weights())
    return copy


def build_model(variant, case, jit_compile, seed=0):
    """A compiled model of one variant, with a freshly initialised backbone.

    Built and compiled under the variant's dtype policy (float32 unless
    `PRECISION` says otherwise) as `cskd_tf.train` does, which restores the
    previous global policy afterwards.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant '{variant}'; expected one of {VARIANTS}.")
    keras.utils.set_random_seed(seed)
    # pylint: disable-next=protected-access  # The trainer's own policy scope, not a copy.
    with train_lib._dtype_policy(PRECISION.get(variant, "none")):
        net = backbones.get(case.backbone, case.num_classes, case.input_shape)
        if variant == "ce":
            model = net
        elif variant == "concat_2b":
            model = Concat2BModel(net)
        elif variant == "cskd_keras_bn":
            model = CSKDModel(with_keras_batch_norm(net))
        else:  # cskd, cskd_bf16
            model = CSKDModel(net)
        return _compiled(model, jit_compile)


def compiled_step(model, data):
    """Returns a zero-argument callable running Keras' compiled train step once on `data`.

    `train_on_batch` builds what `fit` builds before its first step (optimizer
    slots, metric variables) and traces `model.train_function`; the callable
    then calls that same function, the one `fit` runs for every batch, with
    the same structure of arguments, so it is not traced again.

    Args:
      model: compiled keras.Model.
      data: tuple `(x, y)`, where `x` may be the pair `(x, x_pair)`.
    """
    x, y = data
    model.train_on_batch(x, y)
    step = model.train_function
    batch = (x, y, None)  # What train_on_batch passes: (x, y, sample_weight).

    def run_step():
        logs = step(iter([batch]))
        # The loss depends on the whole step: fetching it waits for the step to finish.
        return float(logs["loss"])

    return run_step


def _time_case(case, jit_compile, variants, repeats, warmup, seed):
    x, x_pair, y = random_batch(case, seed)
    steps = {}
    for variant in variants:
        model = build_model(variant, case, jit_compile, seed)
        steps[variant] = compiled_step(model, (x, y) if variant == "ce" else ((x, x_pair), y))
    samples = common.interleaved(steps, repeats, warmup)
    row = dict(
        backbone=case.backbone,
        input_shape=list(case.input_shape),
        batch_size=case.batch_size,
        num_classes=case.num_classes,
        jit_compile=jit_compile,
        step_ms={v: common.summary(samples[v], scale=1e3) for v in variants},
    )
    for name, (numerator, denominator) in RATIOS.items():
        if numerator in variants and denominator in variants:
            estimates = common.ratios(
                row["step_ms"][numerator]["samples"], row["step_ms"][denominator]["samples"]
            )
            row[f"ratio_{name}"] = estimates["of_medians"]
            row[f"ratio_{name}_estimates"] = estimates
    if "cskd" in variants:
        row["target_ratio"] = TARGET_RATIO
        row["meets_target"] = row["ratio_cskd"] <= TARGET_RATIO
    return row


def profile_case(case, jit_compile, repeats, warmup=1, seed=0):
    """Splits the CS-KD step into its parts, each timed as its own compiled function.

    Parts: the partner forward pass (training mode, no tape); the anchor forward
    and backward pass (loss and gradients, nothing applied); the optimizer
    update with those gradients. The full CS-KD and cross-entropy steps are
    timed in the same rounds. Separate functions cannot fuse across the parts'
    boundaries as the full step may, so their sum need not equal the step.

    Returns:
      dict: `part_ms` (summary per part and for both full steps), the parts'
      sum, and `partner_forward_over_ce` (the ratio CS-KD adds, if the rest of
      the step costs what cross-entropy costs).
    """
    x, x_pair, y = random_batch(case, seed)
    cskd = build_model("cskd", case, jit_compile, seed)
    ce_model = build_model("ce", case, jit_compile, seed)
    contenders = dict(
        cskd_step=compiled_step(cskd, ((x, x_pair), y)),
        ce_step=compiled_step(ce_model, (x, y)),
    )
    variables = cskd.trainable_weights

    @tf.function(jit_compile=jit_compile)
    def partner_forward(images):
        return tf.stop_gradient(cskd(images, training=True))

    pair_logits = partner_forward(x_pair)

    @tf.function(jit_compile=jit_compile)
    def anchor_forward_backward(images, labels, targets):
        with tf.GradientTape() as tape:
            logits = cskd(images, training=True)
            ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            kl = losses.class_wise_kl(logits, targets, cskd.temperature)
            loss = tf.reduce_mean(ce) + cskd.lambda_cls * tf.reduce_mean(kl)
        return tape.gradient(loss, variables)

    grads = anchor_forward_backward(x, y, pair_logits)

    @tf.function(jit_compile=jit_compile)
    def optimizer_apply(gradients):
        cskd.optimizer.apply_gradients(zip(gradients, variables))
        return cskd.optimizer.iterations

    def wait(tensor_or_list):
        first = tensor_or_list[0] if isinstance(tensor_or_list, list) else tensor_or_list
        return first.numpy()

    contenders.update(
        partner_forward=lambda: wait(partner_forward(x_pair)),
        anchor_forward_backward=lambda: wait(anchor_forward_backward(x, y, pair_logits)),
        optimizer_apply=lambda: wait(optimizer_apply(grads)),
    )
    samples = common.interleaved(contenders, repeats, warmup)
    part_ms = {name: common.summary(s, scale=1e3) for name, s in samples.items()}
    parts = ("partner_forward", "anchor_forward_backward", "optimizer_apply")
    ce_ms = part_ms["ce_step"]["median"]
    return dict(
        backbone=case.backbone,
        input_shape=list(case.input_shape),
        batch_size=case.batch_size,
        jit_compile=jit_compile,
        part_ms=part_ms,
        sum_of_parts_ms=common.significant(sum(part_ms[p]["median"] for p in parts)),
        partner_forward_over_ce=common.ratio(part_ms["partner_forward"]["median"], ce_ms),
        forward_over_forward_backward=common.ratio(
            part_ms["partner_forward"]["median"], part_ms["anchor_forward_backward"]["median"]
        ),
        ratio_cskd=common.ratio(part_ms["cskd_step"]["median"], ce_ms),
    )


def run(
    cases=None,
    jit_modes=(False, True),
    variants=VARIANTS,
    repeats=7,
    warmup=1,
    profile=False,
    seed=0,
):
    """Times the train steps of every case and jit mode; returns the JSON document.

    Args:
      cases: list of Case, or None for `default_cases()`.
      jit_modes: sequence of bool. `jit_compile` values to time.
      variants: sequence of str. From `VARIANTS`; `ce` is required (the denominator
        of the target's ratio). A ratio of `RATIOS` is reported if both its
        variants are timed.
      repeats: int. Timed rounds (one step of every variant per round).
      warmup: int. Untimed rounds after tracing.
      profile: bool. Also split the CS-KD step into its parts (`profile_case`).
      seed: int. Seeds the weights and the batch.

    Returns:
      dict: `common.result` with one row per (case, jit mode), and `profile` rows if asked.
    """
    cases = default_cases() if cases is None else list(cases)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"Unknown variants {unknown}; expected some of {VARIANTS}.")
    if "ce" not in variants:
        raise ValueError("The variants must include 'ce': the target's ratio is taken over it.")
    rows, profiles = [], []
    for case in cases:
        for jit_compile in jit_modes:
            rows.append(_time_case(case, jit_compile, variants, repeats, warmup, seed))
            if profile:
                profiles.append(profile_case(case, jit_compile, repeats, warmup, seed))
            keras.backend.clear_session()
    settings = dict(
        cases=[dataclasses.asdict(c) for c in cases],
        jit_modes=list(jit_modes),
        variants=list(variants),
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        target_ratio=TARGET_RATIO,
        ratios={name: list(pair) for name, pair in RATIOS.items()},
        precision={v: PRECISION.get(v, "float32") for v in variants},
    )
    extra = dict(profile=profiles) if profile else {}
    return common.result("step_cost", settings, rows, **extra)


def format_tables(document):
    """The step times and ratios (and the profile, if any) as Markdown tables."""
    variants = document["settings"]["variants"]
    ratios = [n for n in RATIOS if any(f"ratio_{n}" in r for r in document["rows"])]
    headers = ["backbone", "batch", "XLA"] + [f"{v} ms" for v in variants]
    headers += [RATIO_LABELS[n] for n in ratios] + ["target met"]
    rows = []
    for r in document["rows"]:
        row = [f"{r['backbone']} @{r['input_shape'][0]}", r["batch_size"], _on(r["jit_compile"])]
        row += [f"{r['step_ms'][v]['median']:.1f}" for v in variants]
        row += [
            (
                f"{r[f'ratio_{n}']:.3f} ({r[f'ratio_{n}_estimates']['of_minima']:.3f})"
                if f"ratio_{n}" in r
                else "-"
            )
            for n in ratios
        ]
        row.append(
            f"{'yes' if r['meets_target'] else 'NO'} (<= {r['target_ratio']})"
            if "meets_target" in r
            else "-"
        )
        rows.append(row)
    text = common.format_table(headers, rows)
    text += "Median ms per step; ratios of medians (of minima in brackets).\n"
    notes = {
        "torch_bn_over_keras_bn": "torch BN / Keras BN: the CS-KD step with "
        "TorchBatchNormalization over the same step with keras.layers.BatchNormalization.",
        "float32_over_bfloat16": "float32 / bf16: the CS-KD step over the same under "
        "mixed_bfloat16 (> 1: bf16 is faster).",
    }
    text += "".join(f"{notes[n]}\n" for n in ratios if n in notes)
    if document.get("profile"):
        headers = [
            "backbone",
            "XLA",
            "ce step",
            "cskd step",
            "partner fwd",
            "anchor fwd+bwd",
            "optimizer",
            "fwd / (fwd+bwd)",
            "partner fwd / ce",
        ]
        rows = []
        for p in document["profile"]:
            ms = {k: v["median"] for k, v in p["part_ms"].items()}
            rows.append(
                [
                    f"{p['backbone']} @{p['input_shape'][0]}",
                    _on(p["jit_compile"]),
                    f"{ms['ce_step']:.1f}",
                    f"{ms['cskd_step']:.1f}",
                    f"{ms['partner_forward']:.1f}",
                    f"{ms['anchor_forward_backward']:.1f}",
                    f"{ms['optimizer_apply']:.1f}",
                    f"{p['forward_over_forward_backward']:.3f}",
                    f"{p['partner_forward_over_ce']:.3f}",
                ]
            )
        text += "\nProfile of the CS-KD step (median ms):\n\n" + common.format_table(headers, rows)
    return text


def _on(flag):
    return "on" if flag else "off"


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0], default_repeats=7)
    parser.add_argument("--batch_size_32", type=int, default=32, help="Batch at 32x32.")
    parser.add_argument("--batch_size_224", type=int, default=8, help="Batch at 224x224.")
    parser.add_argument(
        "--jit", choices=("both", "on", "off"), default="both", help="jit_compile modes."
    )
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds after tracing.")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="Comma-separated contenders to time (ce is required).",
    )
    parser.add_argument(
        "--profile", action="store_true", help="Also time the parts of the CS-KD step."
    )
    args = parser.parse_args(argv)
    jit_modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.jit]
    document = run(
        cases=default_cases(args.batch_size_32, args.batch_size_224),
        jit_modes=jit_modes,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        repeats=args.repeats,
        warmup=args.warmup,
        profile=args.profile,
    )
    return common.report(document, format_tables(document), args.json)


if __name__ == "__main__":
    main()
