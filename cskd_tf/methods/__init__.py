"""Training methods, one module each, registered under their `--method` names.

    method = cskd_tf.methods.get("cskd")
    model = method.build(backbone, options, context)

`cskd_tf.methods.base` says what a method declares. To add one, write a module like
`cskd_tf/methods/cskd.py` that calls `register(Method(...))` and add one import line
below; the training command, `--help` and the README's table then know it.
"""

from cskd_tf.methods.base import Batches
from cskd_tf.methods.base import Context
from cskd_tf.methods.base import Flag
from cskd_tf.methods.base import Method
from cskd_tf.methods.base import flags
from cskd_tf.methods.base import get
from cskd_tf.methods.base import markdown_table
from cskd_tf.methods.base import names
from cskd_tf.methods.base import readers
from cskd_tf.methods.base import register

# The registry, in the order of the tables: the baselines (the paper's, then those that came
# after CS-KD), then CS-KD and its combinations.
# pylint: disable=g-bad-import-order,wrong-import-position
from cskd_tf.methods import ce  # noqa: E402,F401
from cskd_tf.methods import adacos  # noqa: E402,F401
from cskd_tf.methods import virtual_softmax  # noqa: E402,F401
from cskd_tf.methods import max_entropy  # noqa: E402,F401
from cskd_tf.methods import label_smoothing  # noqa: E402,F401
from cskd_tf.methods import ddgsd  # noqa: E402,F401
from cskd_tf.methods import byot  # noqa: E402,F401
from cskd_tf.methods import mixup  # noqa: E402,F401
from cskd_tf.methods import cutmix  # noqa: E402,F401
from cskd_tf.methods import kd  # noqa: E402,F401
from cskd_tf.methods import tf_kd  # noqa: E402,F401
from cskd_tf.methods import zipf_ls  # noqa: E402,F401
from cskd_tf.methods import ps_kd  # noqa: E402,F401
from cskd_tf.methods import dlb  # noqa: E402,F401
from cskd_tf.methods import cskd  # noqa: E402,F401
from cskd_tf.methods import cskd_e  # noqa: E402,F401
from cskd_tf.methods import cskd_sam  # noqa: E402,F401
from cskd_tf.methods import mixup_cskd  # noqa: E402,F401
from cskd_tf.methods import cutmix_cskd  # noqa: E402,F401
from cskd_tf.methods import kd_cskd  # noqa: E402,F401
