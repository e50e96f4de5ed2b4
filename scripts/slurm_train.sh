#!/usr/bin/env bash
# Train on N nodes x 4 GPUs under SLURM: srun starts one torchrun agent per node, and the agents
# join through torchrun's c10d rendezvous on the first node of the allocation. Submit from the
# repository root, for example
#   sbatch --nodes=4 scripts/slurm_train.sh --config configs/h2s.yaml --do_train --do_eval --output_dir runs/h2s_4x4
# Arguments go to CLCL/main_task_retrieval.py. --batch_size stays the global batch over all
# N x 4 processes and must be divisible by their number. Adapt the #SBATCH lines (partition,
# account, time) to your cluster; flags given to sbatch override them.
#SBATCH --job-name=upret
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-upret-%j.out
set -euo pipefail

# sbatch runs a copy of this file from its spool folder, so the repository is the submit folder.
root="${UPRET_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
if [[ ! -f "$root/CLCL/main_task_retrieval.py" ]]; then
  echo "slurm_train.sh: $root is not the repository root; submit from it or set UPRET_ROOT" >&2
  exit 1
fi
if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
  echo "slurm_train.sh: SLURM_JOB_NODELIST is not set; submit this script with sbatch" >&2
  exit 1
fi

# The repository, with its virtual environment, must be on a file system that every node mounts, so one set-up
# on the batch node serves every node.
if [[ -z "${UPRET_SKIP_SETUP:-}" ]]; then
  bash "$root/scripts/setup_env.sh"
fi

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
num_nodes="${#nodes[@]}"
head_node="${nodes[0]}"
rdzv_port="${UPRET_RDZV_PORT:-29500}"
gpus_per_node="${UPRET_GPUS_PER_NODE:-4}"
echo "slurm_train.sh: $num_nodes nodes x $gpus_per_node GPUs, rendezvous at $head_node:$rdzv_port" >&2

# Data-loader workers and the main process share the CPUs of a node, so each GPU process gets a slice.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
# NCCL hints: WARN reports transport problems without flooding the log (INFO lists the chosen
# interfaces and rings). If NCCL picks the wrong network, name the inter-node interface and,
# on InfiniBand clusters, the adapters, for example
#   export NCCL_SOCKET_IFNAME=ib0     # or eth0; also used by the c10d rendezvous store
#   export NCCL_IB_HCA=mlx5
# and set NCCL_IB_DISABLE=1 only on clusters without InfiniBand.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# One task per node. --kill-on-bad-exit stops the other nodes when one agent fails, instead of
# leaving them waiting in a collective until --dist_timeout.
srun --nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "${UPRET_VENV:-$root/.venv}/bin/torchrun" \
  --nnodes="$num_nodes" --nproc_per_node="$gpus_per_node" \
  --rdzv_backend=c10d --rdzv_endpoint="$head_node:$rdzv_port" --rdzv_id="${SLURM_JOB_ID:-upret}" \
  "$root/CLCL/main_task_retrieval.py" "$@"
