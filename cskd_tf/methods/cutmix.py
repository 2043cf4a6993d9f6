"""`cutmix`: CutMix, a box of each batch pasted from a permutation of it, CE on mixed labels.

Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
Features", ICCV 2019, section 3.1; the batch transform is `cskd_tf.data.cutmix`. The model
is the plain classifier: the compiled cross-entropy on the soft labels
`lam * one_hot(y) + (1 - lam) * one_hot(y[perm])` equals the authors'
`lam * CE(f(x~), y) + (1 - lam) * CE(f(x~), y[perm])`, CE being linear in its target.

Flags (shared with `cutmix_cskd`):

* `--cutmix_alpha` (1.0): `lam ~ Beta(alpha, alpha)`. Section 3.1 sets alpha to 1 in every
  experiment (lam uniform on (0, 1)); the authors' commands pass `--beta 1.0`.
* `--cutmix_prob` (unset): the probability that a batch is cut, the authors'
  `--cutmix_prob`, which their code applies per batch (`train.py`: `r < cutmix_prob`).
  Unset, it is their README's setting for the input size: 0.5 for inputs of at most
  64 pixels (their CIFAR command), 1.0 for larger ones (their ImageNet command).

The box, its clipping at the image border and the `lam` recomputed from the clipped area
follow the authors' `rand_bbox` (see `cskd_tf.data.cutmix`).
"""

from cskd_tf.methods.base import Flag, Method, register
from cskd_tf.methods.ce import build_classifier

# CIFAR-size inputs get the authors' CIFAR probability, larger ones their ImageNet one.
SMALL_INPUT = 64
FLAGS = {
    "cutmix_alpha": Flag(1.0, "Beta(alpha, alpha) of CutMix's lam.", bound="> 0"),
    "cutmix_prob": Flag(
        None,
        "probability that a batch is cut; unset: 0.5 for inputs up to 64 px (the authors' "
        "CIFAR setting), else 1.0 (their ImageNet setting).",
        bound="in [0, 1]",
    ),
}


def probability(options, context):
    """`--cutmix_prob`, or the authors' setting for the input size when it is unset."""
    if options["cutmix_prob"] is not None:
        return options["cutmix_prob"]
    return 0.5 if max(context.input_shape[:2]) <= SMALL_INPUT else 1.0


def cut(dataset, options, context, first_batch):
    """Cuts every batch of `dataset` (partners with their anchors' box, lam and permutation)."""
    from cskd_tf.data import cutmix  # pylint: disable=g-import-not-at-top

    return cutmix.cutmix(
        dataset,
        context.num_classes,
        alpha=options["cutmix_alpha"],
        prob=probability(options, context),
        seed=options["seed"],
        first_batch=first_batch,
    )


METHOD = register(
    Method(
        name="cutmix",
        title="CutMix",
        summary="CutMix (Yun et al., ICCV 2019): a box pasted from a permutation of the batch, "
        "CE on labels mixed by the box's area",
        reference="Yun et al., CutMix, ICCV 2019, section 3.1.",
        build=build_classifier,
        flags=FLAGS,
        soft_labels=True,
        transform=cut,
    )
)
