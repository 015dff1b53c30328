"""Shared fixtures: 8 fake CPU devices, quiet TensorFlow, and a tiny config on a tiny dataset."""

import atexit
import os
import shutil
import tempfile

# Compiling is most of the suite's time on CPU. LLVM's optimisations take 40% of it and buy
# nothing on programs this small; XLA's own passes (fusion, layout, sharding) still run, so the
# HLO tested is what users run (only the machine code is less optimised). Processes that tests
# launch get these flags too: runs compared bit for bit must be compiled alike.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Before JAX starts: eight host devices so meshes and pmap are tested on CPU. xdist workers
# inherit the controller's flags; add only what is missing.
_flags = os.environ.get("XLA_FLAGS", "").split()
for _flag in (FAST_COMPILE_XLA_FLAGS, "--xla_force_host_platform_device_count=8"):
    if _flag not in _flags:
        _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)
# One persistent compilation cache directory for the whole run (not a user's own), shared by the
# xdist workers and the processes tests launch, which inherit the environment (the multi-process
# runs are also given it as --config.train.compilation_cache_dir): most tests compile the same
# tiny programs again, and compiling is most of their time on CPU. Entries are reused among
# processes with the same devices. Made here in the controller, before the workers start, and
# removed when it exits. Programs that compile in under a second are left out (JAX's default):
# eager ops on pmap's replicated arrays, loaded back from the cache, made the pmap training test
# abort now and then (about one run in six with a warm cache; never with these left out).
if "T2T_JAX_TEST_CACHE" not in os.environ:
    os.environ["T2T_JAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="t2t_jax_test_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["T2T_JAX_TEST_CACHE"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1.0"
    atexit.register(shutil.rmtree, os.environ["T2T_JAX_TEST_CACHE"], True)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

# Before anything starts JAX's backends, as the command line's entry point does: where no TPU
# or GPU is present, the probes are quietened and the CPU named (the processes tests launch
# inherit the environment).
from t2t_jax.runtime.accelerator_probe import quiet_without_accelerators  # noqa: E402

quiet_without_accelerators()

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


def assert_params_close(actual, expected, atol: float = 2e-6) -> None:
    """Params equal up to `atol`, each named in the message if not."""
    import jax
    import numpy as np

    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(actual))[0]
    for (path, value), want in zip(flat, jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(value, want, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(autouse=True)
def _xdist_group_kept(request):
    """Fail a grouped test if xdist's `--dist loadgroup` has lost its groups, as it did silently
    under pytest 9.2: every test of a group would then train the group's shared model again."""
    if (getattr(request.config.option, "loadgroup", False)
            and request.node.get_closest_marker("xdist_group")
            and request.node.nodeid.rfind("@") <= request.node.nodeid.rfind("]")):
        pytest.fail("--dist loadgroup did not group this test: install a pytest that "
                    "pytest-xdist supports (setup.cfg's test extra pins one)")


# Session scope, and here: every module's tests of the "reverse_model" xdist group share one
# trained model on their worker (a fixture imported into a second module would train again).
@pytest.fixture(scope="session")
def reverse_workdir(tmp_path_factory):
    """A small model trained to exact reversal of 1-6 symbols (~25 s): the default recipe's
    cooldown settles it."""
    import jax

    from t2t_jax.train import train_and_evaluate

    root = tmp_path_factory.mktemp("reverse")
    config = make_tiny_config(str(root / "tfds"))
    config.data.algorithmic.num_train = 4096
    config.data.batch_size = 32
    config.model.update(d_model=64, d_ff=128, num_encoder_layers=2, num_decoder_layers=2)
    config.train.update(num_steps=1500, warmup_steps=100, log_every=500, eval_every=1500,
                        checkpoint_every=1500, cooldown_fraction=1 / 3)
    workdir = str(root / "run")
    result = train_and_evaluate(config, workdir, jax.devices()[:1])
    assert result["eval_accuracy"] > 0.99
    return workdir
