"""Launchers: torchrun, srun-style (one process per rank, only SLURM_* variables) and mpirun give
the same training; and the SLURM / MPI environment mapping (sampo_megatron/runtime/launch_env.py)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from sampo_megatron.runtime.launch_env import first_host, free_port, launch_env, launcher, slurm_env, slurm_port

from helpers import REPO_ROOT, run_torchrun, torchrun_env

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

LAUNCH = REPO_ROOT / "launch" / "pretrain_sampo.py"


def job_id_port() -> int:
    """A free port the SLURM job-id rule can name (20000 + id mod 20000): free_port's choice lies
    below the kernel's ephemeral range, so nothing started meanwhile (gloo's connections, another
    pytest-xdist worker's runs) takes it before the rank binds it."""
    port = free_port()
    assert 20000 <= port < 40000, port
    return port


FLAGS = ["--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"), "--train-iters", "2", "--log-interval", "1"]
# Variables a launcher sets: none may leak from the test's own environment into the srun/MPI runs.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[007-009,012],login1") == "gpu007"
    assert first_host("rack[2-3]-n[01-04]") == "rack2-n01"
    assert first_host("node17") == "node17"
    assert first_host("a,b[1-2]") == "a"
    with pytest.raises(ValueError, match="unbalanced"):
        first_host("gpu[01-02")


def test_slurm_variables_map_to_torch_rendezvous():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "h100-[03-04]",
        "SLURM_JOB_ID": "123456",
    }
    assert launcher(env) == "slurm"
    assert slurm_env(env) == {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "h100-03", "MASTER_PORT": str(20000 + 123456 % 20000),
    }  # fmt: skip
    assert slurm_port(123456) == slurm_port("123456")
    # torchrun inside an allocation (one srun task per node): torchrun's RANK wins, nothing is mapped
    assert launch_env({**env, "RANK": "3"}) == ("torchrun", {})
    # a user's MASTER_ADDR / MASTER_PORT win over the derived ones
    assert slurm_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"})["MASTER_ADDR"] == "10.0.0.1"
    assert launcher({"OMPI_COMM_WORLD_RANK": "0"}) == "mpi" and launcher({}) == "single"
    # One process without a launcher: its store binds a port the kernel picks (port 0), unless given.
    assert launch_env({}) == ("single", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})  # fmt: skip
    assert launch_env({"MASTER_PORT": "6000"})[1]["MASTER_PORT"] == "6000"
    # mpirun's rank 0 names a port for the others: one below the kernel's ephemeral range, bindable now.
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    port = free_port()
    assert 20000 <= port < low
    with socket.socket() as s:
        s.bind(("", port))


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in torchrun_env().items()
        if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC"))
    }
    env.update(extra)
    return env


def run_all(commands_envs, timeout=300) -> list[str]:
    """Start every (command, env) at once (ranks of one job), wait for all; their outputs."""
    procs = []
    for cmd, env in commands_envs:
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
            assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{out[-5000:]}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return outputs


def losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_srun_and_mpirun_train_like_torchrun(tmp_path):
    def flags(name):
        # --save "": no checkpoint (the YAML's save directory is not wanted here)
        return [*FLAGS, "--save", "", "--metrics-file", str(tmp_path / name / "metrics.jsonl")]

    run_torchrun(LAUNCH, 2, *flags("torchrun"))
    expected = losses(tmp_path / "torchrun" / "metrics.jsonl")
    assert len(expected) == 2

    # srun --ntasks 2: each task gets only SLURM_* variables; the port derives from the job id
    port = job_id_port()
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 20000)}
    ranks = [
        ([sys.executable, str(LAUNCH), *flags("srun")], clean_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
        for r in range(2)
    ]  # fmt: skip
    run_all(ranks)
    assert losses(tmp_path / "srun" / "metrics.jsonl") == pytest.approx(expected, rel=1e-6)

    mpirun = shutil.which("mpirun")
    assert mpirun, "Open MPI is missing: .ci/run installs it (apt-get install openmpi-bin libopenmpi-dev)"
    # Open MPI refuses root unless told; --oversubscribe: 2 ranks may exceed the slots it detects.
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [
        mpirun,
        "--oversubscribe",
        "-np",
        "2",
        "-x",
        "OMP_NUM_THREADS",
        "-x",
        "PYTHONPATH",
        sys.executable,
        str(LAUNCH),
        *flags("mpi"),
    ]
    run_all([(cmd, env)])
    assert losses(tmp_path / "mpi" / "metrics.jsonl") == pytest.approx(expected, rel=1e-6)


def test_generate_under_srun_and_mpirun_like_torchrun(tmp_path):
    """tools/generate.py sets up through the trainer's runtime (launcher variables included), so the
    srun-style and mpirun launches write the same JSONL as torchrun."""
    run_torchrun(LAUNCH, 2, *FLAGS, "--train-iters", "1", "--save", str(tmp_path / "ckpt"),
                 "--metrics-file", str(tmp_path / "metrics.jsonl"))  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ("What is the opposite of fast?", "Hello", "Name a day."))
    )
    generate = REPO_ROOT / "tools" / "generate.py"

    def args(name):
        return ["--load", str(tmp_path / "ckpt"), "--prompts", str(prompts), "--output", str(tmp_path / f"{name}.jsonl"),
                "--tensor-model-parallel-size", "2", "--max-new-tokens", "8"]  # fmt: skip

    run_torchrun(generate, 2, *args("torchrun"))
    expected = (tmp_path / "torchrun.jsonl").read_text()
    assert len(expected.splitlines()) == 3

    port = job_id_port()
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 20000)}
    run_all([([sys.executable, str(generate), *args("srun")], clean_env(**slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
             for r in range(2)])  # fmt: skip
    assert (tmp_path / "srun.jsonl").read_text() == expected

    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [shutil.which("mpirun"), "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", sys.executable,
           str(generate), *args("mpi")]  # fmt: skip
    run_all([(cmd, env)])
    assert (tmp_path / "mpi.jsonl").read_text() == expected


# ----------------------------------------------------------------------------- the sbatch script
STUBS = {
    # one task: the step is the training process itself; its pid is what scancel signals
    "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\necho $$ > "$STUB_DIR/step.pid"\nexec "$@"\n',
    "scancel": '#!/bin/bash\necho "scancel $*" >> "$STUB_DIR/calls"\nkill -TERM "$(cat "$STUB_DIR/step.pid")"\n',
    "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$STUB_DIR/calls"\n',
}


def test_sbatch_script_saves_at_the_time_limit_signal_and_requeues(tmp_path):
    """launch/slurm/sampo_srun.sbatch run by bash with srun, scancel and scontrol stubbed (no SLURM
    here): USR1 (what `#SBATCH --signal=B:USR1@300` sends) makes the run save and exit 0 and the
    job requeue; the requeued job's same command resumes and finishes, and does not requeue."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    save = tmp_path / "ckpt"
    port = job_id_port()
    env = clean_env(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", STUB_DIR=str(tmp_path), REPO=str(REPO_ROOT),
                    PYTHON=sys.executable, SLURM_JOB_ID=str(port - 20000), SLURM_NTASKS="1", SLURM_PROCID="0",
                    SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost")  # fmt: skip
    args = ["bash", str(REPO_ROOT / "launch" / "slurm" / "sampo_srun.sbatch"), *FLAGS, "--tensor-model-parallel-size", "1",
            "--train-iters", "30", "--save", str(save), "--save-interval", "1000", "--metrics-file", str(tmp_path / "m.jsonl")]  # fmt: skip
    job = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (tmp_path / "m.jsonl").exists() or not (tmp_path / "m.jsonl").read_text().strip():
            assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:]
            time.sleep(0.1)
        os.kill(job.pid, signal.SIGUSR1)
        out, _ = job.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-3000:]
    at = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= at < 30 and "time limit near" in out and f"exiting after iteration {at} of 30" in out, out[-3000:]
    assert (tmp_path / "calls").read_text().splitlines() == [f"scancel --signal=TERM {port - 20000}",
                                                             f"scontrol requeue {port - 20000}"]  # fmt: skip

    # the requeued job: the same command, to the end
    (tmp_path / "calls").unlink()
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout and int((save / "latest_checkpointed_iteration.txt").read_text()) == 30
    assert not (tmp_path / "calls").exists()  # finished: no requeue
