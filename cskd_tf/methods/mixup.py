"""`mixup`: Mixup, batches mixed with a permutation and soft labels (`cskd_tf.data.mixup`).

Its flag and batch transform are shared with `mixup_cskd`.
"""

from cskd_tf.methods.base import Flag, Method, register
from cskd_tf.methods.ce import build_classifier

FLAGS = {"mixup_alpha": Flag(1.0, "Beta(alpha, alpha) of Mixup.", bound="> 0")}


def mix(dataset, options, context, first_batch):
    """Mixes every batch of `dataset` (partners with their anchors' lambda and permutation)."""
    from cskd_tf.data import mixup  # pylint: disable=g-import-not-at-top

    return mixup.mixup(
        dataset,
        context.num_classes,
        alpha=options["mixup_alpha"],
        seed=options["seed"],
        first_batch=first_batch,
    )


METHOD = register(
    Method(
        name="mixup",
        title="Mixup",
        summary="Mixup (Zhang et al.): batches mixed with a permutation, soft labels",
        reference="Zhang et al., mixup, ICLR 2018 (a baseline of Yun et al., CVPR 2020, Table 3).",
        build=build_classifier,
        flags=FLAGS,
        soft_labels=True,
        transform=mix,
    )
)
