"""`cskd_sam`: CS-KD plus the ICLR submission's `λ_sam·KL(P(x) ‖ P(x_aug))` at T.

No `T²`, and the gradient goes through both views: the submission writes `θ`, not the
fixed copy, for both sides.
"""

from cskd_tf.methods import cskd_e
from cskd_tf.methods.base import Batches, Method, register

METHOD = register(
    Method(
        name="cskd_sam",
        title="CS-KD + L_sam (ICLR)",
        summary="CS-KD + the ICLR submission's `λ_sam·KL(P(x) ‖ P(x_aug))` at T: no `T²`, "
        "gradient through both views",
        reference="The ICLR 2020 submission of Yun et al., section 2 (L_sam).",
        build=cskd_e.build_sample_wise("iclr"),
        batches=Batches(partner="class", clean=True),
        flags=cskd_e.FLAGS,
    )
)
