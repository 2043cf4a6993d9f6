"""`ce`: cross-entropy on single examples, the baseline of every table."""

from cskd_tf.methods.base import Method, register


def build_classifier(backbone, options, context):
    """The backbone trained with the compiled loss alone (`cskd_tf.model.Classifier`)."""
    from cskd_tf.model import Classifier  # pylint: disable=g-import-not-at-top

    return Classifier(backbone)


METHOD = register(
    Method(
        name="ce",
        title="Cross-entropy",
        summary="cross-entropy on single examples",
        reference="The baseline of Yun et al., CVPR 2020, Tables 1 to 6.",
        build=build_classifier,
    )
)
