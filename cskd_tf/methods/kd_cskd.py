"""`kd_cskd`: knowledge distillation from `--teacher` combined with CS-KD (paper Table 4)."""

from cskd_tf.methods import cskd, kd
from cskd_tf.methods.base import Batches, Method, register

METHOD = register(
    Method(
        name="kd_cskd",
        title="KD + CS-KD",
        summary="KD as `kd`, plus CS-KD's class-wise term (paper Table 4)",
        reference="Yun et al., CVPR 2020, section 3.2, Table 4.",
        build=kd.build_kd(cskd=True),
        batches=Batches(partner="class"),
        flags={**cskd.FLAGS, **kd.FLAGS},
        teacher=True,
    )
)
