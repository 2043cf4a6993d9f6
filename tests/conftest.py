"""Test setup: two logical CPU devices, so multi-replica code runs on one CPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

# Must run before TensorFlow initialises its devices, hence at import time.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


def pytest_collection_modifyitems(config, items):
    """Tests marked `exhaustive` run only with CSKD_TF_EXHAUSTIVE=1 (they repeat code paths
    that other tests already run, on other data)."""
    if os.environ.get("CSKD_TF_EXHAUSTIVE") == "1":
        return
    kept = [item for item in items if "exhaustive" not in item.keywords]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if "exhaustive" in i.keywords])
        items[:] = kept


@pytest.fixture
def offline(monkeypatch):
    """No network: every TCP connection fails at once, and no proxy is configured."""
    for var in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable (test)")

    monkeypatch.setattr("socket.create_connection", refuse)
