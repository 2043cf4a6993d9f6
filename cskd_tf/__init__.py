"""cskd_tf: class-wise self-knowledge distillation (CS-KD) for Keras.

Yun et al., "Regularizing Class-wise Predictions via Self-knowledge
Distillation", CVPR 2020.
"""

from cskd_tf import backbones
from cskd_tf import data
from cskd_tf.data.pairs import pair_dataset
from cskd_tf.losses import class_wise_kl
from cskd_tf.model import CSKDModel
from cskd_tf.optim import CoupledWeightDecaySGD
from cskd_tf.optim import step_schedule

__version__ = "0.1.0"
