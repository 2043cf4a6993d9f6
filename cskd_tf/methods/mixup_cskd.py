"""`mixup_cskd`: Mixup + CS-KD, partners mixed with their anchors' λ and permutation."""

from cskd_tf.methods import cskd, mixup
from cskd_tf.methods.base import Batches, Method, register

METHOD = register(
    Method(
        name="mixup_cskd",
        title="Mixup + CS-KD",
        summary="Mixup + CS-KD: partners mixed with their anchors' λ and permutation (paper Table 3)",
        reference="Yun et al., CVPR 2020, section 3.2, Table 3.",
        build=cskd.build_cskd(),
        batches=Batches(partner="class"),
        flags={**cskd.FLAGS, **mixup.FLAGS},
        soft_labels=True,
        transform=mixup.mix,
    )
)
