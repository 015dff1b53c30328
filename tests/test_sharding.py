"""Meshes and shardings on 8 fake CPU devices: every layout trains like one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t2t_jax import sharding
from t2t_jax.data import loader
from t2t_jax.data.batching import Position
from t2t_jax.train import build_experiment
from tests.conftest import assert_params_close, make_tiny_config


def mesh_config(data=1, fsdp=1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_mesh_shape_fills_in_the_rest():
    assert sharding.mesh_shape(mesh_config(data=-1, tensor=2), 8) == (4, 1, 2)
    assert sharding.mesh_shape(mesh_config(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)


@pytest.mark.parametrize(
    "mesh, message",
    [
        (mesh_config(data=3), "needs 3 devices but 8"),
        (mesh_config(data=-1, tensor=3), "does not divide the 8 devices"),
        (mesh_config(data=-1, fsdp=-1), "at most one -1"),
    ],
)
def test_a_mesh_that_does_not_fit_is_a_clear_error(mesh, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(mesh, 8)


def run_steps(config, devices, mode="jit", steps=2):
    """Params and last metrics after `steps` train steps on the first `steps` batches."""
    config.train.mode = mode
    exp = build_experiment(config, devices)
    split = exp.dataset.split("train")
    batches = loader.TrainInput(split, loader.make_planner(config, split), Position())
    with exp.stepper.activate():
        state = exp.stepper.init_state(jax.random.key(0))
        for batch in [next(batches) for _ in range(steps)]:
            device_batch = exp.stepper.put_batch(batch)
            state, metrics = exp.stepper.train(state, device_batch, jax.random.key(1))
        final = exp.stepper.to_checkpoint(state)
    batches.close()
    return exp, final, exp.stepper.fetch_metrics(metrics)


def make_eight_head_config(data_dir):
    config = make_tiny_config(data_dir)
    config.model.num_heads = 8  # so that heads can split 8 ways
    return config


@pytest.fixture
def eight_head_config(data_dir):
    return make_eight_head_config(data_dir)


@pytest.fixture(scope="module")
def reference(data_dir):
    """One device's params and metrics, trained once for every layout compared with it."""
    _, state, metrics = run_steps(make_eight_head_config(data_dir), jax.devices()[:1])
    return jax.device_get(state.params), metrics


def assert_same_training(result, reference):
    _, state, metrics = result
    params, ref_metrics = reference
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    assert_params_close(state.params, params)


@pytest.mark.parametrize(
    "layout",
    [
        dict(data=8, fsdp=1, tensor=1),
        dict(data=1, fsdp=8, tensor=1),
        dict(data=1, fsdp=1, tensor=8),
        dict(data=2, fsdp=2, tensor=2),
    ],
    ids=["data", "fsdp", "tensor", "data_fsdp_tensor"],
)
def test_every_mesh_trains_like_one_device(eight_head_config, reference, layout):
    eight_head_config.mesh.ici.update(layout)
    assert_same_training(run_steps(eight_head_config, jax.devices()), reference)


def test_pmap_trains_like_jit(eight_head_config, reference):
    assert_same_training(run_steps(eight_head_config, jax.devices(), mode="pmap"), reference)


def test_params_are_sharded_as_their_logical_axes_ask(tiny_config):
    tiny_config.mesh.ici.update(dict(data=1, fsdp=4, tensor=2))
    exp, state, _ = run_steps(tiny_config, jax.devices(), steps=1)
    params = state.params
    layer = params["encoder"]["layer_0"]
    assert layer["ffn"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["ffn"]["wo"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert layer["self_attention"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["self_attention"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    # 13 symbols do not split 2 ways: the vocab dimension falls back to replication.
    assert params["shared_embedding"]["embedding"].shape[0] == 13
    assert params["shared_embedding"]["embedding"].sharding.spec == P(None, "fsdp")
    # Adam's moments are laid out like the params they belong to.
    mu = exp.stepper.state_shardings.opt_state[0][0].mu  # chain(adam) = ((adam, lr),)
    assert mu["encoder"]["layer_0"]["ffn"]["wi"]["kernel"].spec == P("fsdp", "tensor")
    shard = layer["ffn"]["wi"]["kernel"].addressable_shards[0].data
    assert shard.shape == (32 // 4, 64 // 2)
