"""The `t2t-jax` command: config errors are one line, info reports the paper's sizes."""

import json
import os
import re
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
        (["--config.train.num_stepz=3"], "unknown config key 'train.num_stepz' in "
         "--config.train.num_stepz=3; did you mean train.num_steps?"),
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
    # Not on a terminal: a line every train.log_every steps in place of the progress bar.
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1/2", "step 2/2"]
    assert all(re.fullmatch(r"step \d/2: loss \d+\.\d{4}, accuracy \d\.\d{4}, [\d,]+ "
                            r"tokens/s, input wait \d+\.\d%, ETA \d+s", line) for line in lines)
    assert "ownloading" not in result.stdout
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
    """Importing the package, its command line and its heaviest modules changes no environment
    variable; the entry point's set-up adds the XLA flags the user did not set."""
    program = (
        "import json, os; before = dict(os.environ)\n"
        "import t2t_jax, t2t_jax.cli, t2t_jax.train, t2t_jax.decode, t2t_jax.perf.bench\n"
        "changed = sorted(k for k in {*before, *os.environ}\n"
        "                 if before.get(k) != os.environ.get(k))\n"
        "t2t_jax.cli.set_up_process()\n"
        "print(json.dumps([changed, os.environ['XLA_FLAGS']]))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=given), timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-1000:]
    changed_on_import, xla_flags = json.loads(shown.stdout.splitlines()[-1])
    assert changed_on_import == []
    assert xla_flags == expected


def test_help_lists_the_commands_and_each_commands_own_flags_with_defaults():
    top = t2t_jax("--help")
    assert top.returncode == 0
    for command in ("train", "decode", "evaluate", "score", "bench", "bench-input", "compile"):
        assert f"    {command} " in top.stdout, command
    decode = t2t_jax("decode", "--help")
    assert decode.returncode == 0
    assert "--beam_size" in decode.stdout and "(default: 4)" in decode.stdout
    assert "--topology" not in decode.stdout  # compile's, not decode's
    bench = t2t_jax("bench", "--help").stdout
    assert "--seq_lens" in bench and "128,256,512" in bench and "--nbest" not in bench


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--config", "configs/tiny.py", "--seq_lens", "abc"],
         "argument --seq_lens: expected integers separated by commas, got 'abc'"),
        (["decode", "--workdir", "x", "--topology", "v5e:4x4"],
         "unrecognized arguments: --topology v5e:4x4"),
        (["average", "--workdir", "x", "--output", "y", "--config.seed=1"],
         "--config.seed=1 changes a config, and average takes none"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(args, message):
    result = t2t_jax(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and message in error_lines(result)[0], result.stderr


def test_deterministic_is_applied_by_the_library_or_refused_once_jax_runs_on_a_gpu(monkeypatch):
    import jax

    from t2t_jax import train
    from t2t_jax.config import tiny_config

    config = tiny_config()
    config.deterministic = True
    program = ("import os; from t2t_jax import train; from t2t_jax.config import tiny_config\n"
               "config = tiny_config(); config.deterministic = True\n"
               "train.apply_process_settings(config); print(os.environ['XLA_FLAGS'])\n")
    fresh = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                           cwd=ROOT, env=dict(os.environ, XLA_FLAGS="--mine"), timeout=120)
    assert fresh.stdout.split() == ["--mine", train.DETERMINISTIC_GPU_FLAG], fresh.stderr
    jax.devices()  # JAX runs here: on the CPU the setting changes nothing, and needs nothing
    monkeypatch.setenv("XLA_FLAGS", "")
    train.apply_process_settings(config)
    assert os.environ["XLA_FLAGS"] == ""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="deterministic=True needs XLA_FLAGS="):
        train.apply_process_settings(config)
