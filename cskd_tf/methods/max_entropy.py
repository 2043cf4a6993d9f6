"""`max_entropy`: the confidence penalty, `CE - beta * H(p)`, on single examples."""

from cskd_tf.methods.base import Method, register
from cskd_tf.methods.ce import build_classifier

METHOD = register(
    Method(
        name="max_entropy",
        title="Maximum-entropy",
        summary="confidence penalty, `CE − β·H(p)` (Pereyra et al.)",
        reference="Pereyra et al., ICLR 2017 workshop (a baseline of Yun et al., CVPR 2020, "
        "Tables 1 and 6).",
        build=build_classifier,
        defaults={"entropy_weight": 0.1},
    )
)
