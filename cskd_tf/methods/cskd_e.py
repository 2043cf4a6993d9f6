"""`cskd_e`: CS-KD plus the paper's sample-wise term, `λ_E·T²·KL(f~(x) ‖ f(x_aug))` (eq. 3).

The clean view is the anchor through the evaluation preprocessing; its pass, like the
partner's, runs in training mode without gradient. `--lambda_sample` is shared with
`cskd_sam`.
"""

from cskd_tf.methods import cskd
from cskd_tf.methods.base import Batches, Flag, Method, register

LAMBDA_SAMPLE = Flag(1.0, "weight (lambda_E, lambda_sam) of the sample-wise term.", bound=">= 0")
FLAGS = {**cskd.FLAGS, "lambda_sample": LAMBDA_SAMPLE}


def build_sample_wise(form):
    """A builder of `cskd_tf.CSKDModel` with the sample-wise term of `form` (cvpr, iclr)."""

    def build(backbone, options, context):
        from cskd_tf.model import CSKDModel  # pylint: disable=g-import-not-at-top

        return CSKDModel(
            backbone,
            temperature=options["temperature"],
            lambda_cls=options["lambda_cls"],
            lambda_sample=options["lambda_sample"],
            sample_form=form,
        )

    return build


METHOD = register(
    Method(
        name="cskd_e",
        title="CS-KD-E",
        summary="CS-KD + the sample-wise term, `λ_E·T²·KL(f~(x) ‖ f(x_aug))` (paper eq. 3, CS-KD-E)",
        reference="Yun et al., CVPR 2020, section 2, eq. 3.",
        build=build_sample_wise("cvpr"),
        batches=Batches(partner="class", clean=True),
        flags=FLAGS,
    )
)
