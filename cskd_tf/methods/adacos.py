"""`adacos`: the AdaCos cosine head with its adaptive scale (`cskd_tf.heads.AdaCosHead`)."""

from cskd_tf.errors import UserError
from cskd_tf.methods.base import Method, register


def build_head_model(head_name):
    """A builder of `cskd_tf.model.HeadModel` with the head registered as `head_name`."""

    def build(backbone, options, context):
        from cskd_tf import heads  # pylint: disable=g-import-not-at-top
        from cskd_tf.model import HeadModel  # pylint: disable=g-import-not-at-top

        return HeadModel(backbone, heads.get(head_name, context.num_classes))

    return build


def _check(options, context):
    if context.num_classes < 3:  # Its fixed scale sqrt(2) log(C - 1) is 0 for two classes.
        raise UserError(
            f"--method=adacos on '{context.dataset}': AdaCosHead needs num_classes >= 3, "
            f"got {context.num_classes}."
        )


METHOD = register(
    Method(
        name="adacos",
        title="AdaCos",
        summary="AdaCos cosine head with the adaptive scale",
        reference="Zhang et al., AdaCos, CVPR 2019, section 4 (a baseline of Yun et al., "
        "CVPR 2020, Tables 1 and 6).",
        build=build_head_model("adacos"),
        check=_check,
    )
)
