"""`byot`: Be Your Own Teacher, auxiliary classifiers on every stage but the last learn from
the deepest one (`cskd_tf.byot.BYOTModel`)."""

from cskd_tf.errors import UserError
from cskd_tf.methods.base import Method, register


def _build(backbone, options, context):
    from cskd_tf.byot import BYOTModel  # pylint: disable=g-import-not-at-top

    try:
        return BYOTModel(backbone)
    except ValueError as err:  # A backbone without stages (the MLP).
        raise UserError(f"--method=byot cannot use --backbone={context.backbone}: {err}") from None


METHOD = register(
    Method(
        name="byot",
        title="BYOT",
        summary="BYOT (Zhang et al., ICCV 2019): an auxiliary classifier after each stage but "
        "the last learns from the deepest one, `(1−α)·CE + α·T²·KL + β·‖F_i − F_C‖²` "
        "(`cskd_tf.byot`; the exported model is the plain backbone); T = 3, α = 0.3, β = 0.03",
        reference="Zhang et al., ICCV 2019, section 3 (a baseline of Yun et al., CVPR 2020, "
        "Table 2).",
        build=_build,
    )
)
