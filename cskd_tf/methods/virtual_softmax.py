"""`virtual_softmax`: the Virtual-softmax head (`cskd_tf.heads.VirtualSoftmaxHead`)."""

from cskd_tf.methods.adacos import build_head_model
from cskd_tf.methods.base import Method, register

METHOD = register(
    Method(
        name="virtual_softmax",
        title="Virtual-softmax",
        summary="Virtual-softmax head (a virtual class in training)",
        reference="Chen et al., Virtual-softmax, NeurIPS 2018, section 3 (a baseline of Yun "
        "et al., CVPR 2020, Tables 1 and 6).",
        build=build_head_model("virtual_softmax"),
    )
)
