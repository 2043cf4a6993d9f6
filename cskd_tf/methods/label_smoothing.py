"""`label_smoothing`: cross-entropy with smoothed targets, on single examples."""

from cskd_tf.methods.base import Method, register
from cskd_tf.methods.ce import build_classifier

METHOD = register(
    Method(
        name="label_smoothing",
        title="Label-smoothing",
        summary="cross-entropy with smoothed targets (Szegedy et al.)",
        reference="Szegedy et al., CVPR 2016, section 7 (a baseline of Yun et al., CVPR 2020, "
        "Tables 1 and 6).",
        build=build_classifier,
        defaults={"label_smoothing": 0.1},
    )
)
