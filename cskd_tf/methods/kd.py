"""`kd`: knowledge distillation from a fixed teacher (Hinton et al.), on single examples.

Its flags are shared with `kd_cskd`.
"""

from cskd_tf.methods.base import TEMPERATURE_BOUNDS, Flag, Method, register

FLAGS = {
    "teacher": Flag(None, "the teacher, a run folder, an export folder or a .keras file.", "string"),
    "kd_alpha": Flag(0.9, "weight of distillation (CE gets 1 - alpha).", bound="in [0, 1]"),
    "kd_temperature": Flag(
        4.0, "distillation temperature.", bound=TEMPERATURE_BOUNDS
    ),
}


def build_kd(cskd):
    """A builder of `cskd_tf.CSKDModel` distilling `context.teacher`, with CS-KD's class-wise
    term (`--temperature`, `--lambda_cls`) when `cskd` is true."""

    def build(backbone, options, context):
        from cskd_tf.model import CSKDModel  # pylint: disable=g-import-not-at-top

        terms = dict(lambda_cls=0.0)
        if cskd:
            terms = dict(temperature=options["temperature"], lambda_cls=options["lambda_cls"])
        return CSKDModel(
            backbone,
            teacher=context.teacher,
            kd_alpha=options["kd_alpha"],
            kd_temperature=options["kd_temperature"],
            **terms,
        )

    return build


METHOD = register(
    Method(
        name="kd",
        title="KD",
        summary="distillation from `--teacher` (a run folder, export folder or `.keras` file): "
        "`(1−α)·CE + α·T_kd²·KL(teacher ‖ student)`",
        reference="Hinton et al., 2015 (Yun et al., CVPR 2020, Table 4).",
        build=build_kd(cskd=False),
        flags=FLAGS,
        teacher=True,
    )
)
