"""Loading the `.keras` files this package writes, whatever model class trained them."""

import keras


def load_model(path):
    """`keras.models.load_model(path, compile=False)` with every cskd_tf model class registered.

    The training models (CSKDModel, HeadModel, DDGSDModel, BYOTModel) register
    themselves with Keras when their modules are imported; this imports them all.
    """
    # pylint: disable=g-import-not-at-top,unused-import
    from cskd_tf import byot  # noqa: F401
    from cskd_tf import ddgsd  # noqa: F401
    from cskd_tf import model  # noqa: F401

    return keras.models.load_model(path, compile=False)
