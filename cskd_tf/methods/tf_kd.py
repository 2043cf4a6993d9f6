"""`tf_kd`: teacher-free knowledge distillation from a virtual teacher (Tf-KD_reg).

Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization",
CVPR 2020, section 5 (Tf-KD_reg, eq. 9). The virtual teacher is right on every example:
it puts `a` on the true class and `(1 - a) / (C - 1)` on each other one, `p^d`, and it is
softened by the temperature T, `p^d_T`, as a teacher's output is (eq. 5). The authors' code
(yuanli2333/Teacher-free-Knowledge-Distillation, `my_loss_function.py`,
`loss_kd_regularization`) softens it as `softmax(p^d / T)`, the probabilities taken as
logits; it is the only definition of `p^d_T` they give, so both forms below use it.

Two forms (`--tf_kd_form`):

* `paper` (default), eq. 9: `(1 - alpha) * CE(p, y) + alpha * KL(p^d_T || p_T)`, the student
  softened by the same T, `p_T = softmax(z / T)`, the KL summed over classes and averaged
  over the batch. Eq. 9 writes no `T^2` factor, and neither does this form.
* `code`, the authors' `loss_kd_regularization`: the student at T = 1,
  `KL(softmax(p^d / T) || softmax(z))`, reduced by PyTorch's `KLDivLoss()` default, the
  element-wise mean (the batch mean divided by C), times `params.multiplier`:
  `(1 - alpha) * CE + alpha * multiplier * KL / C`. The first author explains the T = 1
  student (issue #3 of that repository): it works better on CIFAR-100, while the higher
  temperature of the paper is used on Tiny-ImageNet and ImageNet. This is the form behind
  the paper's CIFAR-100 numbers; its ResNet-18 setting is T = 20, alpha = 0.1,
  multiplier = 100 (`experiments/base_experiments/base_resnet18/params.json`), which makes
  `multiplier / C = 1`, the batch-mean KL.

Flags and where their defaults come from:

* `--tf_kd_alpha` (0.1): the weight of the virtual teacher's term; the authors' ResNet-18
  CIFAR-100 `reg_alpha` (their MobileNetV2 / ShuffleNetV2 runs use 0.95, ResNeXt-29 0.5).
* `--tf_kd_temperature` (20): T; the authors' ResNet-18 CIFAR-100 `reg_temperature` (their
  other CIFAR-100 models use 10 to 40; issue #19 of their repository quotes 20 or 40 from
  Table 6 of the paper's supplementary material).
* `--tf_kd_correct_prob` (0.99): `a`; the code's `correct_prob`, hard-coded, the same for
  every model and data set.
* `--tf_kd_form` (`paper`): see above.
* `--tf_kd_multiplier` (1): the code form's `params.multiplier` (100 for their ResNet-18,
  50 for GoogLeNet, 1 for MobileNetV2 and ShuffleNetV2); the paper has none, so the paper
  form refuses any other value.

The cross-entropy is the compiled loss (so `--label_smoothing` applies to it as to every
method's).
"""

from cskd_tf.errors import UserError
from cskd_tf.methods.base import TEMPERATURE_BOUNDS, Flag, Method, register

FORMS = ("paper", "code")
FLAGS = {
    "tf_kd_alpha": Flag(
        0.1, "weight alpha of the virtual teacher's KL (CE gets 1 - alpha).", bound="in [0, 1]"
    ),
    "tf_kd_temperature": Flag(
        20.0, "temperature T that softens the virtual teacher.", bound=TEMPERATURE_BOUNDS
    ),
    "tf_kd_correct_prob": Flag(
        0.99, "probability a the virtual teacher puts on the true class.", bound="in [0, 1]"
    ),
    "tf_kd_form": Flag(
        "paper",
        "paper: KL(p^d_T || p_T), the student at T too (eq. 9); code: the authors' code, the "
        "student at T = 1 and the element-wise mean of the KL times --tf_kd_multiplier.",
        kind="string",
    ),
    "tf_kd_multiplier": Flag(
        1.0, "the code form's factor on its KL term (the authors' ResNet-18: 100).", bound=">= 0"
    ),
}
PARTS = ("ce_loss", "tf_kd_loss")


def virtual_teacher(labels, num_classes, correct_prob):
    """The virtual teacher `p^d`: `a` on the true class, `(1 - a) / (C - 1)` elsewhere.

    Args:
      labels: int tensor `[batch]`.
      num_classes: int >= 2.
      correct_prob: float. `a`.

    Returns:
      float32 tensor `[batch, num_classes]`; each row sums to 1.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    other = (1.0 - correct_prob) / (num_classes - 1)
    hot = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    return hot * correct_prob + (1.0 - hot) * other


def teacher_free_kl(logits, labels, temperature, correct_prob, form="paper"):
    """The virtual teacher's term, one value per example (the caller weights and reduces).

    `paper`: `KL(softmax(p^d / T) || softmax(z / T))`. `code`: `KL(softmax(p^d / T) ||
    softmax(z)) / C`, so that its batch mean is PyTorch's element-wise `KLDivLoss()`. Both
    from `log_softmax` (`cskd_tf.losses.kl_divergence`); no gradient reaches the teacher,
    which is a constant.

    Args:
      logits: float tensor `[batch, C]`. The student's.
      labels: int tensor `[batch]`.
      temperature: float > 0. T.
      correct_prob: float. `a`.
      form: str. `paper` or `code`.

    Returns:
      float32 tensor `[batch]`.
    """
    from cskd_tf import losses  # pylint: disable=g-import-not-at-top

    num_classes = logits.shape[-1]
    teacher = virtual_teacher(labels, num_classes, correct_prob)
    if form == "paper":
        return losses.kl_divergence(teacher, logits, temperature)
    return losses.kl_divergence(teacher / temperature, logits, 1.0) / num_classes


def objective(model, x, y, sample_weight):
    """`(1 - alpha) * CE + alpha * multiplier * mean(teacher-free KL)`, one forward pass."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf.model import batch_mean  # pylint: disable=g-import-not-at-top

    options = model.options
    alpha = options["tf_kd_alpha"]
    logits = model(x, training=True)
    ce = model.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=True)
    labels = tf.reshape(y, [-1])
    values = teacher_free_kl(
        logits,
        labels,
        options["tf_kd_temperature"],
        options["tf_kd_correct_prob"],
        options["tf_kd_form"],
    )
    if sample_weight is not None:
        values *= tf.cast(tf.reshape(sample_weight, [-1]), values.dtype)
    kd = options["tf_kd_multiplier"] * batch_mean(values)
    loss = (1.0 - alpha) * ce + alpha * kd
    return dict(loss=loss, parts={"ce_loss": ce, "tf_kd_loss": kd}, logits=logits)


def check(options, context):
    """Refuses an unknown form, a multiplier in the paper form, and fewer than 2 classes."""
    form = options["tf_kd_form"]
    if form not in FORMS:
        raise UserError(f"--tf_kd_form must be one of {', '.join(FORMS)}, got {form!r}.")
    if form == "paper" and options["tf_kd_multiplier"] != 1:
        raise UserError(
            "--tf_kd_multiplier is the authors' code's factor (--tf_kd_form=code); the "
            "paper's eq. 9 has none: weight the term with --tf_kd_alpha."
        )
    if context.num_classes < 2:
        raise UserError("--method=tf_kd needs at least 2 classes (its teacher spreads 1 - a).")


METHOD = register(
    Method(
        name="tf_kd",
        title="Tf-KD",
        summary="Tf-KD_reg (Yuan et al., CVPR 2020): `(1−α)·CE + α·KL(p^d_T ‖ p_T)` to a "
        "virtual teacher with `a` on the true class, softened by T (`--tf_kd_form=code`: "
        "the authors' code, student at T = 1)",
        reference="Yuan et al., CVPR 2020, section 5, eq. 9.",
        objective=objective,
        parts=PARTS,
        flags=FLAGS,
        check=check,
    )
)
