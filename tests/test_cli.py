"""The `t2t-jax` command: config errors are one line, info reports the paper's sizes."""

import os
import subprocess
import sys

import pytest

from tests.conftest import FAST_COMPILE_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t2t_jax(*args, env=None, input=None):
    environment = dict(os.environ, **(env or {}))
    environment["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS  # one device, as a user's CPU machine has
    return subprocess.run(
        [sys.executable, "-m", "t2t_jax.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300,
        input=input if input is not None else "",
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if "error" in line]


def test_info_reports_the_base_model_size():
    # As on a fresh machine without a TPU: none of the TPU settings the package makes.
    quiet = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")
    result = subprocess.run(
        [sys.executable, "-m", "t2t_jax.cli", "info", "--config", "configs/base.py"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={k: v for k, v in os.environ.items() if k not in quiet}
        | {"XLA_FLAGS": FAST_COMPILE_XLA_FLAGS},
    )
    assert result.returncode == 0, result.stderr
    # libtpu (installed with the test extras) probes for a TPU at start; it must do so quietly.
    for probe_error in ("Failed to find host bounds", "unexpected worker hostname",
                        "Source Location Trace"):
        assert probe_error not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "total parameters: 63045632"
    assert any(line.split()[0] == "shared_embedding" and "18,944,000" in line for line in lines)
    assert any(line.startswith("mesh: data=1, fsdp=1, tensor=1") for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.bogus=3"], "unknown config key 'model.bogus'"),
        (["--config.model.d_model=abc"], "--config.model.d_model=abc"),
        (["--config.mesh.ici.data=3"], "needs 3 devices but 1 are present"),
        (["--config.model.num_heads=7"], "must be divisible by model.num_heads=7"),
        (["--config.data.input_order=global"], "data.input_order was retired: the input order "
         "no longer depends on the number of processes"),
    ],
)
def test_bad_config_is_one_line_naming_the_problem(args, message):
    result = t2t_jax("info", "--config", "configs/base.py", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and message in error_lines(result)[0]


def test_missing_config_file_is_one_line():
    result = t2t_jax("info", "--config", "configs/missing.py")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "No such file" in error_lines(result)[0]


def test_train_prints_metrics_and_samples(tmp_path, data_dir):
    result = t2t_jax(
        "train", "--config", "configs/reverse.py", "--workdir", str(tmp_path / "run"),
        f"--config.data.data_dir={data_dir}", "--config.data.algorithmic.num_train=64",
        "--config.data.algorithmic.num_validation=16", "--config.data.algorithmic.num_test=16",
        "--config.model.d_model=32", "--config.model.d_ff=64", "--config.train.num_steps=2",
        "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
        "--config.train.log_every=1", "--config.train.num_decode_examples=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval_accuracy:" in result.stdout
    assert result.stdout.count("(target ") == 2
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
    maps = t2t_jax("attention", "--workdir", str(tmp_path / "run"), "--input", "3 1 4",
                   "--output", str(tmp_path / "maps"))
    assert maps.returncode == 0, maps.stderr[-2000:]
    assert maps.stdout.startswith("3 1 4 </s> -> ")
    assert os.path.getsize(tmp_path / "maps" / "attention_maps.png") > 1000


@pytest.mark.parametrize(
    "given, expected",
    [
        ("", "--xla_gpu_enable_triton_gemm=false"),
        ("--xla_dump_to=/tmp/x", "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false"),
        ("--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm=true"),
    ],
)
def test_the_command_line_adds_its_xla_flags_unless_the_user_set_them(given, expected):
    shown = subprocess.run(
        [sys.executable, "-c", "import os, t2t_jax.cli; print(os.environ['XLA_FLAGS'])"],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, XLA_FLAGS=given),
        timeout=60,
    )
    assert shown.stdout.strip() == expected, shown.stderr[-1000:]
