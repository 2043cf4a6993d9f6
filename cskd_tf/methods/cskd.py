"""`cskd`: class-wise self-knowledge distillation (CS-KD), the paper's method.

Its flags are declared here and shared by the methods that combine CS-KD with another one.
"""

from cskd_tf.methods.base import TEMPERATURE, Batches, Flag, Method, register

LAMBDA_CLS = Flag(1.0, "weight of the class-wise term.", bound=">= 0")
FLAGS = {"temperature": TEMPERATURE, "lambda_cls": LAMBDA_CLS}


def build_cskd(**fixed):
    """A builder of `cskd_tf.CSKDModel` from the options, with `fixed` arguments on top."""

    def build(backbone, options, context):
        from cskd_tf.model import CSKDModel  # pylint: disable=g-import-not-at-top

        arguments = dict(temperature=options["temperature"], lambda_cls=options["lambda_cls"])
        arguments.update(fixed)
        return CSKDModel(backbone, **arguments)

    return build


METHOD = register(
    Method(
        name="cskd",
        title="CS-KD",
        summary="CS-KD (paper eq. 1)",
        reference="Yun et al., CVPR 2020, section 2 and Algorithm 1.",
        build=build_cskd(),
        batches=Batches(partner="class"),
        flags=FLAGS,
    )
)
