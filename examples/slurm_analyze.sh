#!/bin/bash
# susc analyze on a SLURM cluster: one torchrun per node, one rank per GPU.
# Submit with `sbatch examples/slurm_analyze.sh RUN_DIR`; resubmit the same command after a
# node failure or pre-emption: finished chains are kept as shards and not computed again.
#SBATCH --job-name=susc-analyze
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=12:00:00
#SBATCH --requeue
set -euo pipefail
RUN_DIR=${1:?usage: sbatch examples/slurm_analyze.sh RUN_DIR}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$SLURM_GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER:29500" \
  -m susc_callback analyze "$RUN_DIR" \
  --probe "$RUN_DIR/probe.jsonl" --sampling-data "$RUN_DIR/train.jsonl" \
  --components heads --num-chains 4 --num-draws 100 --no-progress
