"""Several processes on one machine (jax.distributed over CPU collectives), preemption by a real
SIGTERM, and checkpoints that restore on other topologies."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t2t_jax import checkpoint, run_config
from t2t_jax.runtime import distributed
from t2t_jax.train import build_experiment, train_and_evaluate
from tests.conftest import FAST_COMPILE_XLA_FLAGS, assert_params_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local_multiprocess.sh")


def overrides(data_dir, **fields):
    """--config.* flags for configs/tiny.py, the same fields a test sets on its tiny_config; the
    processes share the test run's compilation cache (conftest)."""
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    return [f"--config.data.data_dir={data_dir}",
            f"--config.train.compilation_cache_dir={cache}"] + [
        f"--config.{key.replace('__', '.')}={value}" for key, value in fields.items()
    ]


def apply(config, **fields):
    for key, value in fields.items():
        *parents, leaf = key.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def launch(num_processes, workdir, args, devices=4, wait=True):
    env = dict(
        os.environ,
        XLA_FLAGS=FAST_COMPILE_XLA_FLAGS,  # the launcher gives each process its own device count
        DEVICES_PER_PROCESS=str(devices),
        T2T_JAX=f"{sys.executable} -m t2t_jax.cli",
        INIT_TIMEOUT="60",
    )
    command = ["bash", LAUNCHER, str(num_processes), "configs/tiny.py", str(workdir), *args]
    popen = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return popen
    out, err = popen.communicate(timeout=300)
    assert popen.returncode == 0, err[-3000:] + logs_tail(workdir)
    return out, err


def logs_tail(workdir):
    logs = os.path.join(workdir, "logs")
    text = ""
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        if name.endswith(".out"):
            with open(os.path.join(logs, name)) as f:
                text += f"\n--- {name}\n" + f.read()[-1500:]
    return text


def params_of(workdir, step):
    return checkpoint.restore_host_state(workdir, step)[0]["params"]


# Every run below: the same (data=4, tensor=2) mesh. Two processes: ici (data=2, tensor=2)
# within each, dcn data=2 across them; one process: its eight devices.
# No samples decoded at the end: a decode compile per process says nothing of these tests.
SHARED = dict(mesh__ici__tensor=2, train__eval_every=1000, train__num_decode_examples=0)


def test_a_run_saved_by_two_processes_resumes_on_one_like_an_unstopped_one(
    tiny_config, data_dir, tmp_path
):
    multi = tmp_path / "multi"
    launch(2, multi, overrides(data_dir, train__num_steps=4, **SHARED))
    assert checkpoint.checkpoint_steps(str(multi)) == [2, 4]
    for host in (0, 1):
        with open(multi / "logs" / f"host_{host}.log") as f:
            assert f"process {host} of 2" in f.read()
    # The input position (the same on every process) is in the checkpoint: one process goes on
    # with the same global batches, reading all the rows the two read between them.
    position = checkpoint.restore_input_position(str(multi), 4)
    assert (position["epoch"], position["index"]) == (0, 4 * 16)
    launch(1, multi, overrides(data_dir, train__num_steps=6, **SHARED), devices=8)
    with open(multi / "metrics.jsonl") as f:  # written by process 0 alone: each step once
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [2, 4, 6]
    with open(multi / "logs" / "host_0.log") as f:
        assert "restored checkpoint at step 4" in f.read()

    single = str(tmp_path / "single")
    train_and_evaluate(apply(tiny_config, train__num_steps=6, **SHARED), single)
    # Same math; only the order of the cross-process sums (gloo vs in-process) may differ.
    assert_params_close(params_of(str(multi), 6), params_of(single, 6))


def wait_for_metrics(workdir, popen, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert popen.poll() is None, popen.communicate()[1][-3000:] + logs_tail(workdir)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        time.sleep(0.2)
    popen.kill()
    raise AssertionError("training did not start in time" + logs_tail(workdir))


ENDLESS = dict(train__num_steps=10**6, train__log_every=1, train__checkpoint_every=10**6)


def test_sigterm_to_one_process_saves_every_process_at_one_step(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    popen = launch(2, workdir, overrides(data_dir, **ENDLESS, **SHARED), wait=False)
    wait_for_metrics(workdir, popen)
    with open(os.path.join(workdir, "logs", "pids")) as f:
        pids = [int(line) for line in f]
    os.kill(pids[1], signal.SIGTERM)  # the notice reaches one host only
    _, err = popen.communicate(timeout=240)
    assert popen.returncode == 0, err[-3000:] + logs_tail(workdir)
    # One checkpoint, at the step both processes agreed on, with the input position there.
    [step] = checkpoint.checkpoint_steps(workdir)
    assert checkpoint.restore_input_position(workdir, step)["index"] == step * 16
    with open(os.path.join(workdir, "logs", "process_0.out")) as f:
        assert f"preempted: saved step {step}" in f.read()
    # What the save holds is the state of step `step`: the exact-resume test below and the
    # two-process test above check the values.
    assert int(checkpoint.restore_host_state(workdir, params_only=False)[0]["step"]) == step


def test_sigterm_saves_exits_0_and_the_resumed_run_matches_an_unstopped_one(
    tiny_config, data_dir, tmp_path
):
    workdir = str(tmp_path / "stopped")
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)  # one device, as in the runs below
    popen = subprocess.Popen(
        [sys.executable, "-m", "t2t_jax.cli", "train", "--config", "configs/tiny.py",
         "--workdir", workdir, *overrides(data_dir, **ENDLESS)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for_metrics(workdir, popen)
    popen.send_signal(signal.SIGTERM)
    out, err = popen.communicate(timeout=240)
    assert popen.returncode == 0, err[-3000:]
    [step] = checkpoint.checkpoint_steps(workdir)
    assert f"preempted: saved step {step}" in out

    one_device = jax.devices()[:1]
    fields = dict(ENDLESS, train__num_steps=step + 3)
    train_and_evaluate(apply(tiny_config, **fields), workdir, one_device)
    straight = str(tmp_path / "straight")
    train_and_evaluate(tiny_config, straight, one_device)
    jax.tree.map(np.testing.assert_array_equal, params_of(workdir, step + 3),
                 params_of(straight, step + 3))


def test_a_nonfinite_update_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_config, tmp_path
):
    from t2t_jax.train import TrainingDiverged

    workdir = str(tmp_path / "run")
    devices = jax.devices()[:2]
    train_and_evaluate(apply(tiny_config, train__num_steps=2), workdir, devices)
    good = params_of(workdir, 2)
    diverging = apply(tiny_config, train__num_steps=4, train__learning_rate=float("inf"))
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 2\)"):
        train_and_evaluate(diverging, workdir, devices)
    assert checkpoint.checkpoint_steps(workdir) == [2]

    result = train_and_evaluate(apply(diverging, train__on_nonfinite="skip"), workdir, devices)
    assert result["nonfinite_steps"] == 2  # steps 3 and 4, logged together
    jax.tree.map(np.testing.assert_array_equal, params_of(workdir, 4), good)


def test_two_deterministic_runs_write_bit_identical_checkpoints(tiny_config, tmp_path):
    tiny_config.deterministic = True
    tiny_config.model.dropout_rate = 0.1
    for name in ("a", "b"):
        train_and_evaluate(tiny_config, str(tmp_path / name))
    a = checkpoint.restore_host_state(str(tmp_path / "a"), 4, params_only=False)[0]
    b = checkpoint.restore_host_state(str(tmp_path / "b"), 4, params_only=False)[0]
    assert len(jax.tree.leaves(a)) > 10
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture
def checkpoint_from_data4_tensor2(tiny_config, tmp_path):
    """A train state saved from a (data=4, tensor=2) mesh, and its values on the host."""
    tiny_config.mesh.ici.update(dict(data=4, tensor=2))
    exp = build_experiment(tiny_config, jax.devices(), str(tmp_path))
    with exp.stepper.activate():
        state = exp.stepper.init_state(jax.random.key(7))
    manager = checkpoint.make_manager(str(tmp_path), tiny_config.train)
    checkpoint.save(manager, 1, state, tiny_config, exp.tokenizer)
    manager.wait_until_finished()
    return manager, jax.device_get(state)


@pytest.mark.parametrize(
    "layout, num_devices, sharded_ways",
    [(dict(data=1, fsdp=8, tensor=1), 8, 8), (dict(data=2, fsdp=1, tensor=1), 2, 1),
     (dict(data=1, fsdp=1, tensor=1), 1, 1)],
)
def test_checkpoint_restores_on_another_topology(
    tiny_config, tmp_path, checkpoint_from_data4_tensor2, layout, num_devices, sharded_ways
):
    manager, saved = checkpoint_from_data4_tensor2
    tiny_config.mesh.ici.update(layout)
    exp = build_experiment(tiny_config, jax.devices()[:num_devices], str(tmp_path / "other"))
    target = checkpoint.restore_target(exp.stepper.abstract_state, exp.stepper.state_shardings)
    restored = checkpoint.restore(manager, 1, target)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    # The embedding table (vocab, embed) is split over fsdp on its embed axis.
    table = restored.params["shared_embedding"]["embedding"]
    assert len(table.sharding.device_set) == num_devices
    assert table.addressable_shards[0].data.shape[1] == table.shape[1] // sharded_ways


def test_an_interrupted_save_is_never_taken_for_a_checkpoint(tiny_config, tmp_path):
    import shutil

    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config, workdir, jax.devices()[:1])
    directory = checkpoint.checkpoint_dir(workdir)
    # What a save killed mid-write leaves: Orbax's temporary directory, never renamed.
    partial = os.path.join(directory, "6.orbax-checkpoint-tmp-1795626345")
    shutil.copytree(os.path.join(directory, "4"), partial)
    shutil.rmtree(os.path.join(partial, "state"))
    assert checkpoint.checkpoint_steps(workdir) == [2, 4]
    manager = checkpoint.make_manager(workdir, tiny_config.train)
    assert manager.latest_step() == 4
    result = train_and_evaluate(apply(tiny_config, train__num_steps=6), workdir, jax.devices()[:1])
    assert checkpoint.checkpoint_steps(workdir)[-1] == 6 and "loss" in result


@pytest.mark.parametrize(
    "mode, address, environ, expected",
    [
        ("auto", None, {}, False),
        ("auto", "10.0.0.1:1234", {}, True),
        ("auto", None, {"JAX_COORDINATOR_ADDRESS": "h:1"}, True),
        ("auto", None, {"SLURM_NTASKS": "1"}, False),
        ("auto", None, {"SLURM_NTASKS": "16"}, True),
        ("auto", None, {"OMPI_COMM_WORLD_SIZE": "4"}, True),
        ("auto", None, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, True),
        ("auto", None, {"TPU_WORKER_HOSTNAMES": "localhost"}, False),
        ("on", None, {}, True),
        ("off", "10.0.0.1:1234", {"SLURM_NTASKS": "16"}, False),
    ],
)
def test_distributed_starts_only_when_there_are_several_processes(
    mode, address, environ, expected
):
    assert distributed.requested(mode, address, environ) is expected


def test_an_unreachable_coordinator_is_a_clear_error_not_a_hang(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "t2t_jax.cli", "train", "--config", "configs/tiny.py",
         "--workdir", str(tmp_path), "--coordinator_address", "localhost:1",
         "--num_processes", "2", "--process_id", "1", "--init_timeout", "2"],
        cwd=ROOT, env=dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS), capture_output=True,
        text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no coordinator answered at localhost:1 within 2s" in result.stderr
    assert time.monotonic() - started < 60


def test_workdir_files_take_urls_as_well_as_local_paths(tiny_config):
    """gs:// workdirs go through tf.io.gfile like this in-memory file system."""
    from t2t_jax import metrics

    workdir = "ram://t2t_jax_test/run"
    assert checkpoint.checkpoint_dir(workdir) == "ram://t2t_jax_test/run/checkpoints"
    assert checkpoint.checkpoint_steps(workdir) == []
    run_config.save_config_json(tiny_config, workdir)
    assert run_config.load_config_json(workdir).model.d_model == tiny_config.model.d_model
    for step in (1, 2):  # a second writer continues the file, as a resumed run does
        writer = metrics.JsonlWriter(f"{workdir}/metrics.jsonl")
        writer.write_scalars(step, {"loss": 1.0 / step})
        writer.close()
    import tensorflow as tf

    with tf.io.gfile.GFile(f"{workdir}/metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f.read().splitlines()] == [1, 2]
