"""`ddgsd`: data-distortion guided self-distillation, two views of each image
(`cskd_tf.ddgsd.DDGSDModel`)."""

from cskd_tf.methods.base import TEMPERATURE, Batches, Method, register


def _build(backbone, options, context):
    from cskd_tf.ddgsd import DDGSDModel  # pylint: disable=g-import-not-at-top

    return DDGSDModel(backbone, temperature=options["temperature"])


METHOD = register(
    Method(
        name="ddgsd",
        title="DDGSD",
        summary="DDGSD (Xu & Liu, AAAI 2019): two augmented views of each image, CE on both, "
        "`T²`-scaled KL each way (each target fixed) and a linear MMD between their pooled "
        "features (`cskd_tf.ddgsd`); weights 1 and 1",
        reference="Xu & Liu, AAAI 2019 (a baseline of Yun et al., CVPR 2020, Table 2).",
        build=_build,
        batches=Batches(partner="self"),
        flags={"temperature": TEMPERATURE},
    )
)
