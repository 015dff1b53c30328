"""Shared fixtures: 8 fake CPU devices, quiet TensorFlow, and a tiny config on a tiny dataset."""

import os

# Before JAX starts: eight host devices so meshes and pmap are tested on CPU.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

tf.config.set_visible_devices([], "GPU")
tfds.display_progress_bar(False)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir for the whole session, so each tiny task is generated once."""
    return str(tmp_path_factory.mktemp("tfds"))


def make_tiny_config(data_dir: str):
    """A model and task small enough that a step compiles and runs in well under a second."""
    from t2t_jax.config import tiny_config

    config = tiny_config()
    config.data.data_dir = data_dir
    config.train.compilation_cache_dir = ""
    config.train.async_checkpoints = False
    return config


@pytest.fixture
def tiny_config(data_dir):
    return make_tiny_config(data_dir)
