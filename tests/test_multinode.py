"""Multi-node launch: two torchrun "nodes" on this machine, and the SLURM example script.

Each node is its own torchrun agent with one process (--nnodes=2 --nproc_per_node=1), joined over
the loopback interface either by the c10d rendezvous or by the static MASTER_ADDR/MASTER_PORT form.
A CiCo run (no Monte Carlo noise, no dropout) on two nodes must match one process on the same
global batch. The DistributedSampler gives the two ranks the two halves of each global batch, and
the gathered loss does not depend on the order of the items.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_driver import _data_args, _free_port, corpus  # noqa: F401 (fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER = REPO_ROOT / "CLCL" / "main_task_retrieval.py"
SLURM_SCRIPT = REPO_ROOT / "scripts" / "slurm_train.sh"
TORCHRUN = Path(sys.executable).parent / "torchrun"
EPOCHS = 2
GLOBAL_BATCH = 8


def _run_args(corpus: Path, output_dir: Path) -> list[str]:
    return [
        *_data_args(corpus, output_dir),
        "--method", "cico", "--do_train", "--do_eval", "--epochs", str(EPOCHS), "--batch_size", str(GLOBAL_BATCH),
    ]


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("single")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(DRIVER), *_run_args(corpus, output_dir)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def _node_command(rendezvous: str, node_rank: int, port: int) -> list[str]:
    command = [str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}"]
    if rendezvous == "c10d":
        # Node 0 hosts the rendezvous store; --local_addr keeps the workers' MASTER_ADDR on the loopback
        # interface instead of this machine's host name.
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=upret-multinode-test",
                    f"--rdzv_conf=is_host={int(node_rank == 0)}", "--local_addr=127.0.0.1"]
    else:
        command += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    return command


def _launch_two_nodes(rendezvous: str, run_args: list[str]) -> list[str]:
    """Start both node agents, wait for them and return their output; fail if either exits non-zero."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    nodes = [
        subprocess.Popen([*_node_command(rendezvous, rank, port), str(DRIVER), *run_args], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} exited with {node.returncode}:\n{output[-4000:]}"
    return outputs


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_match_single_process(corpus, single_process, tmp_path, rendezvous):
    output_dir = tmp_path / "two_nodes"
    _launch_two_nodes(rendezvous, _run_args(corpus, output_dir))

    log = (output_dir / "log.txt").read_text()
    assert f"global batch {GLOBAL_BATCH} ({GLOBAL_BATCH // 2} per process, world size 2)" in log
    expected = json.loads((single_process / "results.json").read_text())
    actual = json.loads((output_dir / "results.json").read_text())

    assert actual["steps"] == expected["steps"] == EPOCHS * (32 // GLOBAL_BATCH)
    for epoch in range(EPOCHS):
        assert actual["history"][epoch]["train"]["loss"] == pytest.approx(
            expected["history"][epoch]["train"]["loss"], rel=1e-5), epoch
        for direction in ("t2v", "v2t"):
            assert actual["history"][epoch]["dev"][direction] == pytest.approx(
                expected["history"][epoch]["dev"][direction], rel=1e-6), (epoch, direction)
    for direction in ("t2v", "v2t"):
        assert actual["eval"][direction] == pytest.approx(expected["eval"][direction], rel=1e-6), direction

    expected_weights = torch.load(single_process / "checkpoint_last.pt", weights_only=True)["model"]
    actual_weights = torch.load(output_dir / "checkpoint_last.pt", weights_only=True)["model"]
    assert set(actual_weights) == set(expected_weights)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_slurm_script_syntax():
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-n", str(SLURM_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = SLURM_SCRIPT.read_text()
    for required in ("#SBATCH --nodes", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                     "scontrol show hostnames", "--rdzv_backend=c10d", "--rdzv_endpoint"):
        assert required in text, required


def test_slurm_script_rendezvous_endpoint(tmp_path):
    # A fake scontrol and srun stand in for SLURM, so the script's own logic runs: the endpoint must be
    # the first host of the node list, and srun must start one torchrun per node with the driver flags.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        "[[ \"$1 $2\" == 'show hostnames' ]] || exit 2\n"
        "printf 'gpu-node-07\\ngpu-node-08\\ngpu-node-11\\n'\n"
    )
    (fake_bin / "srun").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$SRUN_ARGS_FILE\"\n")
    for tool in ("scontrol", "srun"):
        (fake_bin / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-08,11]",
               SLURM_NNODES="3", SLURM_JOB_ID="4242", SRUN_ARGS_FILE=str(tmp_path / "srun_args.txt"),
               UPRET_SKIP_SETUP="1")
    result = subprocess.run(["bash", str(SLURM_SCRIPT), "--config", "configs/ph.yaml", "--do_train"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    arguments = (tmp_path / "srun_args.txt").read_text().splitlines()
    assert "--rdzv_endpoint=gpu-node-07:29500" in arguments
    assert "--nnodes=3" in arguments
    assert "--nproc_per_node=4" in arguments
    assert "--rdzv_id=4242" in arguments
    assert arguments[-2:] == ["configs/ph.yaml", "--do_train"]
