"""`zipf_ls`: Zipf's label smoothing, a one-pass self-distillation (Zipf's LS).

Liang et al., "Efficient One Pass Self-distillation with Zipf's Label Smoothing", ECCV 2022
(its method and its overview figure, which the official repository megvii-research/zipfls
ships as `megengine_zipfls/pics/framework.png`). The loss is

    CE(f(x), y) + lambda * KL(P_zipf || softmax(z_{-y}))

where `z_{-y}` are the C - 1 non-target logits of the same forward pass (the target class is
left out and the rest renormalised) and `P_zipf` gives the non-target class of rank r the
mass `r^-power / sum_r' r'^-power`. The ranking is the network's own, from that forward pass
and without gradient:

* `--zipf_ls_rank=dense` (the overview figure, and `--dense` in every command of the
  authors' README; the default for a backbone whose features pool a spatial map): the
  classifier is applied to every position of the last feature map (before global pooling),
  each position votes for its arg-max class, and the classes are ranked by their votes;
  classes without a vote share the rank after the last voted one (ties take the smallest
  rank, as scipy's `rankdata(method="min")` in the code);
* `--zipf_ls_rank=logits`: the classes are ranked by the logits themselves (the code without
  `--dense`; the default for a backbone without a spatial map, such as `mlp`).

Where the paper and the code differ (`--zipf_ls_form`):

* `paper` (default): the overview figure ranks the non-target classes among themselves
  (Zipf's law over the non-target classes only: the most-voted non-target class has rank 1);
* `code`: the official code (`pytorch_zipfls/losses.py`, `gen_pdf` and
  `get_masked_distribution`, and the same in `megengine_zipfls/loss.py`) ranks all C classes,
  the target included, then drops the target and renormalises: when the target has the most
  votes, the non-target ranks start at 2, and the Zipf distribution is flatter.

The KL is summed over the C - 1 classes and averaged over the batch in both (`kl_loss` in
the code). The code's other options (`--mask`, `--friend`, soft ranks, other distributions,
the auxiliary heads of `--deeplayer` > 1) are off in the authors' commands and left out.

Flags and where their defaults come from:

* `--zipf_ls_lambda` (0.1): the weight of the KL; the authors' `--loss_lambda` for
  CIFAR-100 and ImageNet (1.0 for TinyImageNet and iNaturalist-21).
* `--zipf_ls_power` (1.0): the Zipf exponent; the code's `--power` default, in every command.
* `--zipf_ls_rank` (unset: `dense`, or `logits` without a spatial map), `--zipf_ls_form`
  (`paper`): see above.
* `--zipf_ls_upsample` (unset): the dense map is enlarged this many times (bilinear, as
  PyTorch's `upsample(..., mode="bilinear")` with `align_corners=False`) before voting.
  Unset: 2 for inputs of at most 64 pixels (the authors' CIFAR-100 and TinyImageNet commands,
  `--upsample bilinear`, which doubles the size), 1 for larger ones (their ImageNet and
  iNaturalist commands pass none). The paper's figure shows no upsampling; it is the code's.

The cross-entropy is the compiled loss (so `--label_smoothing` applies to it as to every
method's).
"""

from cskd_tf.errors import UserError
from cskd_tf.methods.base import Flag, Method, register

FORMS = ("paper", "code")
RANKS = ("dense", "logits")
# Inputs up to this size get the authors' CIFAR / TinyImageNet upsampling.
SMALL_INPUT = 64
FLAGS = {
    "zipf_ls_lambda": Flag(0.1, "weight lambda of the Zipf KL term.", bound=">= 0"),
    "zipf_ls_power": Flag(1.0, "exponent of the Zipf law, rank^-power.", bound=">= 0"),
    "zipf_ls_rank": Flag(
        None,
        "dense: rank classes by the arg-max votes of the last feature map's positions; "
        "logits: by the logits; unset: dense if the backbone pools a spatial map, else logits.",
        kind="string",
    ),
    "zipf_ls_upsample": Flag(
        None,
        "enlarge the feature map this many times (bilinear) before voting; unset: 2 for "
        "inputs up to 64 px, else 1.",
        kind="integer",
        bound="> 0",
    ),
    "zipf_ls_form": Flag(
        "paper",
        "paper: Zipf ranks among the non-target classes; code: ranks among all classes, "
        "the target then dropped, as the authors' code.",
        kind="string",
    ),
}
PARTS = ("ce_loss", "zipf_loss")


class _Held:
    """Holds the feature-map model out of Keras' tracking: it only shares the backbone's layers."""

    def __init__(self, model, head):
        self.model, self.head = model, head


def non_target_index(labels, num_classes):
    """The C - 1 class ids other than each label, in order: int32 `[batch, C - 1]`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    others = tf.range(num_classes - 1)[None, :]
    labels = tf.cast(tf.reshape(labels, [-1, 1]), tf.int32)
    return others + tf.cast(others >= labels, tf.int32)


def zipf_ranks(scores, labels, form="paper"):
    """The Zipf ranks (from 1) of the non-target classes, by decreasing score.

    Ties take the smallest rank of their group (scipy's `rankdata(method="min")`).

    Args:
      scores: float tensor `[batch, C]`. Votes or logits; no gradient flows through them.
      labels: int tensor `[batch]`.
      form: str. `paper`: ranks among the non-target classes; `code`: ranks among all
        classes, the target included.

    Returns:
      float32 tensor `[batch, C - 1]`, in the order of `non_target_index`.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    scores = tf.stop_gradient(tf.cast(scores, tf.float32))
    num_classes = scores.shape[-1]
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    others = tf.gather(scores, non_target_index(labels, num_classes), batch_dims=1)
    # 1 + the number of strictly larger scores: the "min" rank, in O(C log C).
    not_larger = tf.searchsorted(tf.sort(others, axis=-1), others, side="right")
    ranks = num_classes - not_larger
    if form == "code":
        target = tf.gather(scores, labels[:, None], batch_dims=1)
        ranks += tf.cast(target > others, tf.int32)
    return tf.cast(ranks, tf.float32)


def zipf_kl(logits, labels, scores, power=1.0, form="paper"):
    """`KL(P_zipf || softmax(z_{-y}))` per example, over the non-target classes.

    Args:
      logits: float tensor `[batch, C]`. The logits fitted (gradient flows through them).
      labels: int tensor `[batch]`.
      scores: float tensor `[batch, C]`. What ranks the classes (`zipf_ranks`).
      power: float >= 0. The Zipf exponent.
      form: str. `paper` or `code` (`zipf_ranks`).

    Returns:
      float32 tensor `[batch]`.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf import losses  # pylint: disable=g-import-not-at-top

    num_classes = logits.shape[-1]
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    index = non_target_index(labels, num_classes)
    others = tf.gather(tf.cast(logits, tf.float32), index, batch_dims=1)
    # softmax(-power * log r) is r^-power normalised: the Zipf target, from log_softmax.
    log_weights = -power * tf.math.log(zipf_ranks(scores, labels, form))
    return losses.kl_divergence(log_weights, others, 1.0)


def dense_votes(feature_map, kernel, bias, upsample=1):
    """Votes of the feature map's positions: how many pick each class as their arg-max.

    Args:
      feature_map: float tensor `[batch, height, width, D]`, before global pooling.
      kernel, bias: the classifier's `[D, C]` and `[C]`.
      upsample: int >= 1. Bilinear enlargement of the map first (half-pixel centres, as
        PyTorch's `align_corners=False`).

    Returns:
      float32 tensor `[batch, C]`; each row sums to the number of positions.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    feature_map = tf.cast(feature_map, tf.float32)
    if upsample > 1:
        size = tf.shape(feature_map)[1:3] * upsample
        feature_map = tf.image.resize(feature_map, size, method="bilinear")
    logits = tf.tensordot(feature_map, tf.cast(kernel, tf.float32), 1) + tf.cast(bias, tf.float32)
    num_classes = logits.shape[-1]
    picks = tf.one_hot(tf.argmax(logits, axis=-1), num_classes)
    return tf.stop_gradient(tf.reduce_sum(picks, axis=[1, 2]))


def upsample_factor(options, input_shape):
    """`--zipf_ls_upsample`, or the authors' setting for the input size when it is unset."""
    if options["zipf_ls_upsample"] is not None:
        return options["zipf_ls_upsample"]
    return 2 if max(input_shape[:2]) <= SMALL_INPUT else 1


def state(model):
    """For dense ranking: a model of the same layers that also returns the last feature map."""
    import keras  # pylint: disable=g-import-not-at-top

    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top

    rank = model.options["zipf_ls_rank"]
    if rank == "logits":
        return
    backbone = model.backbone
    feature_map = backbone.get_layer(backbones.FEATURES_LAYER).input
    if len(feature_map.shape) != 4:
        if rank is None:  # Unset: the logits rank the classes.
            return
        raise UserError(
            f"--zipf_ls_rank=dense needs a backbone whose features pool a spatial map, which "
            f"'{backbone.name}' has not: pass --zipf_ls_rank=logits."
        )
    both = keras.Model(backbone.input, [feature_map, backbone.output])
    held = _Held(both, backbone.get_layer("logits"))
    model._zipf_dense = held  # pylint: disable=protected-access


def objective(model, x, y, sample_weight):
    """`CE + lambda * mean(KL(P_zipf || softmax(z_{-y})))`, from one forward pass."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf.model import batch_mean  # pylint: disable=g-import-not-at-top

    options = model.options
    held = getattr(model, "_zipf_dense", None)
    if held is None:
        logits = model(x, training=True)
        scores = logits
    else:  # The same pass gives the logits and the map that votes.
        feature_map, logits = held.model(x, training=True)
        factor = upsample_factor(options, model.backbone.input_shape[1:])
        scores = dense_votes(feature_map, held.head.kernel, held.head.bias, factor)
    ce = model.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True)
    values = zipf_kl(logits, y, scores, options["zipf_ls_power"], options["zipf_ls_form"])
    if sample_weight is not None:
        values *= tf.cast(tf.reshape(sample_weight, [-1]), values.dtype)
    zipf = batch_mean(values)
    loss = ce + options["zipf_ls_lambda"] * zipf
    return dict(loss=loss, parts={"ce_loss": ce, "zipf_loss": zipf}, logits=logits)


def check(options, context):
    """Refuses an unknown rank or form, and fewer than 2 classes."""
    rank, form = options["zipf_ls_rank"], options["zipf_ls_form"]
    if rank is not None and rank not in RANKS:
        raise UserError(f"--zipf_ls_rank must be one of {', '.join(RANKS)}, got {rank!r}.")
    if form not in FORMS:
        raise UserError(f"--zipf_ls_form must be one of {', '.join(FORMS)}, got {form!r}.")
    if context.num_classes < 2:
        raise UserError("--method=zipf_ls needs at least 2 classes (it smooths non-target ones).")


METHOD = register(
    Method(
        name="zipf_ls",
        title="Zipf's LS",
        summary="Zipf's label smoothing (Liang et al., ECCV 2022): `CE + λ·KL(P_zipf ‖ "
        "softmax(z_−y))`, the non-target classes' Zipf target ranked by the network's own "
        "dense votes (or logits)",
        reference="Liang et al., ECCV 2022 (the method and its overview figure).",
        objective=objective,
        parts=PARTS,
        flags=FLAGS,
        check=check,
        state=state,
    )
)
