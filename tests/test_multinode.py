"""Two nodes on one machine, over gloo: two `accelerate launch` (machine ranks 0 and 1) meeting at a
rendezvous on the loopback address, and `sbatch --nodes=2 run.sh` on a two-node Slurm cluster. Each
must train with world size 2 and write the metrics of two processes on one machine (the same seed:
conftest.two_processes).
What only a real cluster can show: docs/slurm.md."""

import json
import os
import re
import socket
import subprocess
import time

import pytest
from conftest import ROOT, TWO
from test_slurm import stop, wait

CLOCKS = ("_s", "_share", "_mb")  # times, their shares and memory: all else in metrics.jsonl is computed


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith(CLOCKS)} for row in rows]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scripts_env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["LGG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU anywhere: two processes on one GPU make no NCCL group
    return env


@pytest.mark.slow
def test_two_machines_at_a_loopback_rendezvous_train_as_two_processes_on_one(
    phantoms, scripts_env, two_processes, tmp_path
):
    out = tmp_path / "run"
    launch = [
        *("accelerate", "launch", "--config_file", "accelerate_configs/multinode.yaml"),
        *("--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())),
    ]
    train = ["unet/train.py", "--data-dir", str(phantoms), *TWO, "--output-dir", str(out)]
    machines = [
        subprocess.Popen(
            [*launch, "--machine_rank", str(rank), *train],
            cwd=ROOT,
            env=scripts_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [m.communicate(timeout=300)[0] for m in machines]
    finally:
        for m in machines:
            m.kill()  # a launcher left waiting for the other at the rendezvous
    assert [m.returncode for m in machines] == [0, 0], "\n".join(logs)
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["world_size"] == 2
        and summary["device"].startswith("cpu (")
        and summary["global_batch_size"] == 8
    )
    assert metrics(out) == metrics(two_processes)


def two_node_conf(conf, state, new):
    """cluster.sh's one-node configuration with its node as two, both on this host at 127.0.0.1, each
    slurmd on its own port with its own spool, pid and log files (%n: the node's name)."""
    conf = conf.replace(str(state), str(new))
    conf = re.sub(r"^(SlurmdSpoolDir|SlurmdPidFile|SlurmdLogFile)=(.*)$", r"\1=\2-%n", conf, flags=re.M)
    conf = re.sub(r"^SlurmctldPort=.*$", f"SlurmctldPort={free_port()}", conf, flags=re.M)
    host, rest = re.search(r"^NodeName=(\S+) (.*)$", conf, re.M).groups()
    nodes = "\n".join(
        f"NodeName=node-{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} {rest}" for i in (0, 1)
    )
    conf = re.sub(r"^NodeName=.*$", nodes, conf, flags=re.M)
    return re.sub(r"^(PartitionName=\S+) Nodes=\S+", r"\1 Nodes=node-[0-1]", conf, flags=re.M)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A Slurm cluster of two nodes on this machine. tests/slurm/cluster.sh starts the one-node
    cluster first (munged, and whether Slurm runs here at all); its configuration is then reused
    with two node entries. Debian's slurmd is built without --enable-multiple-slurmd, but `slurmd -N
    <node>` with a port per node is all two daemons on one host need."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test starts munged, slurmctld and slurmd as root")
    state = tmp_path_factory.mktemp("slurm")
    cluster = ["bash", str(ROOT / "tests" / "slurm" / "cluster.sh"), str(state)]
    p = subprocess.run(cluster, capture_output=True, text=True, timeout=180)
    if p.returncode != 0:
        pytest.skip(f"no Slurm cluster could start here: {p.stdout.strip() or p.stderr.strip()}")
    one = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["scontrol", "shutdown"], env=one, capture_output=True)
    new = state / "two"
    for d in ("spool", "state", "log"):
        (new / d).mkdir(parents=True)
    (new / "slurm.conf").write_text(two_node_conf((state / "slurm.conf").read_text(), state, new))
    env = {**os.environ, "SLURM_CONF": str(new / "slurm.conf"), "LGG_CACHE_DIR": str(state / "cache")}
    env = {k: v for k, v in env.items() if not k.startswith("ACCELERATE_")}
    daemons = [["slurmctld"], ["slurmd", "-N", "node-0"], ["slurmd", "-N", "node-1"]]
    for daemon in daemons:
        p = subprocess.run([*daemon, "-f", env["SLURM_CONF"]], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"{' '.join(daemon)} did not start: {p.stderr.strip()}")
    yield env, new
    stop(env)


def sbatch_on_two_nodes(env, tmp_path, *args):
    """`sbatch --nodes=2 run.sh args` once both nodes are idle; its log when it has ended."""
    for _ in range(60):
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True)
        if p.stdout.split().count("idle") == 2:
            break
        time.sleep(1)
    else:
        pytest.skip(f"the two nodes did not come up (sinfo: {p.stdout.split()})")
    small = ["--nodes=2", "--gres=none", "--cpus-per-task=1", "--mem=1G", "--time=00:10:00"]
    cmd = ["sbatch", "--parsable", *small, f"--output={tmp_path}/%x-%j.out", "run.sh", *args]
    env = {**env, "MASTER_PORT": str(free_port())}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    wait(env, job)
    return job, (tmp_path / f"lgg-seg-{job}.out").read_text()


@pytest.mark.slow
def test_run_sh_on_two_slurm_nodes_trains_as_two_processes_on_one_machine(
    two_nodes, phantoms, two_processes, tmp_path
):
    env, state = two_nodes
    out = tmp_path / "run"
    job, log = sbatch_on_two_nodes(
        env, tmp_path, "unet", "--data-dir", str(phantoms), *TWO, "--output-dir", str(out)
    )
    assert "run.sh: unet on 2 node(s) x 1 process(es)" in log, log
    # torch's note that the head's address was ignored: the nodes met at their own localhost:29400
    assert "master_addr is only used for static" not in log, log
    for node in ("node-0", "node-1"):  # one launcher on each node: srun's step ran on both
        assert f"launch task StepId={job}.0" in (state / "log" / f"slurmd.log-{node}").read_text(), node
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["device"].startswith("cpu ("), log
    assert metrics(out) == metrics(two_processes)


@pytest.mark.slow
def test_run_sh_on_two_slurm_nodes_ends_a_user_error_with_its_line(two_nodes, tmp_path):
    env, _ = two_nodes
    job, log = sbatch_on_two_nodes(env, tmp_path, "unet", "--bad-flag")
    assert log.strip().splitlines()[-1] == "error: unrecognized arguments: --bad-flag", log
    record = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    assert "ExitCode=2:0" in record.stdout, record.stdout
