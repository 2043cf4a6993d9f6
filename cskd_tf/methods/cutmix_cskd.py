"""`cutmix_cskd`: CutMix + CS-KD, partners cut with their anchors' box, λ and permutation.

As `mixup_cskd` combines Mixup with CS-KD (Yun et al., CVPR 2020, section 3.2, Table 3):
the partner of a cut anchor is the same cut of the two anchors' partners
(`cskd_tf.data.cutmix`), and the loss is `cskd_tf.CSKDModel`'s, the cross-entropy on the
mixed labels plus `lambda_cls * T^2 * KL(f~(x'~) || f(x~))`. The CS-KD paper does not
combine CS-KD with CutMix; this is the Mixup recipe of its Table 3 with CutMix's batches.
Flags: CS-KD's (`--temperature`, `--lambda_cls`) and CutMix's (`--cutmix_alpha`,
`--cutmix_prob`, see `cskd_tf.methods.cutmix`).
"""

from cskd_tf.methods import cskd, cutmix
from cskd_tf.methods.base import Batches, Method, register

METHOD = register(
    Method(
        name="cutmix_cskd",
        title="CutMix + CS-KD",
        summary="CutMix + CS-KD: partners cut with their anchors' box, λ and permutation",
        reference="Yun et al., ICCV 2019, section 3.1, with Yun et al., CVPR 2020, section 3.2.",
        build=cskd.build_cskd(),
        batches=Batches(partner="class"),
        flags={**cskd.FLAGS, **cutmix.FLAGS},
        soft_labels=True,
        transform=cutmix.cut,
    )
)
