#!/usr/bin/env bash
# Usage: launch/gpu_multi.sh --config=CFG --workdir=DIR --data-dir=DIR
#          [--coordinator=HOST:PORT --num-processes=N --process-id=I] [options] [-- MAIN_ARGS...]
#
# Runs smope_jax on several GPU machines: start this script once on every
# machine (one process per machine, driving all of its GPUs), with the same
# --coordinator, --num-processes and --config, and --process-id 0..N-1.
# Process 0 must run on the coordinator host; HOST:PORT must be reachable from
# every machine. The main program gets
#   --coordinator_address=HOST:PORT --num_processes=N --process_id=I
# and joins with exactly these: each process keeps every GPU it sees (JAX's
# SLURM detection, which would leave it the one GPU numbered SLURM_LOCALID, is
# switched off).
#
# Under SLURM (run with `srun`, one task per node; see launch/slurm_example.sbatch)
# any of the three left out is derived: N from SLURM_NTASKS, I from
# SLURM_PROCID, HOST from the first node of SLURM_STEP_NODELIST (or
# SLURM_JOB_NODELIST) via `scontrol show hostnames`, PORT from --port or, as
# JAX does, from the job id (61440 + SLURM_JOB_ID % 4096).
#
# The workdir must be shared by all machines: gs://... or a shared filesystem.
# Every machine reads the datasets from --data-dir, which is checked on each
# before its process starts.
#
# GPU memory: unless already set in the environment, the run gets
#   XLA_PYTHON_CLIENT_PREALLOCATE=false, XLA_PYTHON_CLIENT_MEM_FRACTION=.9,
#   JAX_PLATFORMS=cuda (a machine without a usable GPU fails loudly).
# A missing nvidia-smi is only a warning here (compute nodes and containers
# often lack it although their GPUs work); JAX_PLATFORMS=cuda still stops a
# machine without GPUs. Use --require-gpu-check to make it an error.
#
# Preflight: before its process starts, every machine runs `python -m
# smope_jax.preflight --config=CFG --target=gpu:MODELxN` (with the same
# overrides), which compiles every step of the run for N GPUs in all: the GPUs
# this machine uses (--gpus, else CUDA_VISIBLE_DEVICES, else all) times
# --num-processes, each machine taken to have the same GPUs. MODEL comes from
# nvidia-smi (H100 -> h100, A100 80GB -> a100-80gb, A100 40GB -> a100-40gb).
# A run that does not fit in GPU memory or does not compile is refused with
# the preflight's verdict (exit status 3). Every machine reaches the same
# verdict, so all stop or all start together: none waits for a process 0 that
# never comes. It is skipped, saying so, for other GPU models and without
# nvidia-smi. Without the GPU compiler packages (the project's extra
# preflight-gpu) it stops, naming what to pip install.
#
# Options (--opt VALUE and --opt=VALUE both work):
#   --config CFG            config file, e.g. configs/cifar100.py (required)
#   --workdir DIR           shared output directory, gs://... or shared FS (required)
#   --data-dir DIR          prepared TFDS datasets, gs://... or a path every machine
#                           sees, passed as --config.data_dir (required; the run
#                           is refused when DIR does not exist: checked on each
#                           machine, gs:// with `gcloud storage ls` when gcloud
#                           is on PATH)
#   --coordinator HOST:PORT address of process 0 (required outside SLURM)
#   --num-processes N       number of machines/processes (required outside SLURM)
#   --process-id I          this machine's index, 0..N-1 (required outside SLURM)
#   --port P                coordinator port when HOST is derived from SLURM
#   --gpus LIST             GPUs to use on this machine (CUDA_VISIBLE_DEVICES)
#   --config-args "..."     extra overrides, e.g. "--config.seed=3";
#                           arguments after `--` are passed on verbatim as well
#   --python PY             Python interpreter (default: $PYTHON, else python3, else python)
#   --preallocate           XLA_PYTHON_CLIENT_PREALLOCATE=true
#   --mem-fraction F        XLA_PYTHON_CLIENT_MEM_FRACTION, 0 < F <= 1 (default .9)
#   --require-gpu-check     fail if nvidia-smi is missing
#   --skip-preflight        start without the preflight (see below)
#   --dry-run               print the command instead of running it
#   -h, --help              print this help
#
# Example (two machines, 8 GPUs each):
#   node-a$ launch/gpu_multi.sh --config=configs/cifar100.py --workdir=gs://b/run \
#             --data-dir=gs://b/tfds --coordinator=node-a:12355 --num-processes=2 --process-id=0
#   node-b$ launch/gpu_multi.sh --config=configs/cifar100.py --workdir=gs://b/run \
#             --data-dir=gs://b/tfds --coordinator=node-a:12355 --num-processes=2 --process-id=1
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

# First host of a SLURM node list such as "gpu[03-05,09],gpu11" -> "gpu03",
# for when scontrol is not available.
first_host() {
  local list=$1 head
  head=${list%%,*}
  if [[ $list == *\[* && ${list%%\[*} != *,* ]]; then
    local prefix=${list%%\[*} inner=${list#*\[}
    inner=${inner%%\]*}
    inner=${inner%%,*}
    head=$prefix${inner%%-*}
  fi
  printf '%s' "$head"
}

# ---------------------------------------------------------------- arguments
gpu_option_defaults
COORD="" NPROC="" PID_ARG="" PORT="" REQUIRE_GPU_CHECK=0

FLAG_OPTS=(--dry-run --preallocate --require-gpu-check --skip-preflight)
VALUE_OPTS=(--config --workdir --data-dir --coordinator --num-processes --process-id --port
  --gpus --config-args --python --mem-fraction)
DASH_VALUE_OPTS=(--config-args)

set_opt() { # set_opt NAME [VALUE], for parse_args
  case $1 in
    --require-gpu-check) REQUIRE_GPU_CHECK=1 ;;
    --coordinator) COORD=$2 ;;
    --num-processes) NPROC=$2 ;;
    --process-id) PID_ARG=$2 ;;
    --port) PORT=$2 ;;
    *) set_gpu_opt "$@" ;;
  esac
}

parse_gpu_args "$@"

# Fill in from SLURM what was not given.
if [[ -n ${SLURM_PROCID:-} ]]; then
  [[ -n $NPROC ]] || NPROC=${SLURM_NTASKS:-}
  [[ -n $PID_ARG ]] || PID_ARG=$SLURM_PROCID
  if [[ -z $COORD ]]; then
    nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
    [[ -n $nodelist ]] || die "--coordinator is required: SLURM_STEP_NODELIST/SLURM_JOB_NODELIST are not set"
    host=""
    if command -v scontrol >/dev/null 2>&1; then
      host=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1 || true)
    fi
    [[ -n $host ]] || host=$(first_host "$nodelist")
    if [[ -z $PORT ]]; then
      [[ ${SLURM_JOB_ID:-} =~ ^[0-9]+$ ]] || die "--port is required: SLURM_JOB_ID is not set"
      PORT=$((SLURM_JOB_ID % 4096 + 61440))
    fi
    COORD=$host:$PORT
  fi
  if [[ ${SLURM_NTASKS_PER_NODE:-1} =~ ^[0-9]+$ ]] && ((${SLURM_NTASKS_PER_NODE:-1} > 1)); then
    warn "SLURM_NTASKS_PER_NODE=$SLURM_NTASKS_PER_NODE: each process drives all GPUs it sees; use one task per node (--ntasks-per-node=1)"
  fi
fi

[[ -n $COORD ]] || die "--coordinator HOST:PORT is required (or run under SLURM with srun)"
[[ -n $NPROC ]] || die "--num-processes is required (or run under SLURM with srun)"
[[ -n $PID_ARG ]] || die "--process-id is required (or run under SLURM with srun)"
[[ $COORD =~ ^[^:[:space:]]+:[0-9]+$ || $COORD =~ ^\[[0-9a-fA-F:.]+\]:[0-9]+$ ]] ||
  die "--coordinator must be HOST:PORT, got '$COORD'"
((10#${COORD##*:} >= 1 && 10#${COORD##*:} <= 65535)) || die "--coordinator port out of range: '$COORD'"
if ! [[ $NPROC =~ ^[0-9]+$ ]] || ((10#$NPROC < 1)); then
  die "--num-processes must be a positive integer, got '$NPROC'"
fi
[[ $PID_ARG =~ ^[0-9]+$ ]] || die "--process-id must be an integer in 0..$((10#$NPROC - 1)), got '$PID_ARG'"
((10#$PID_ARG < 10#$NPROC)) || die "--process-id must be in 0..$((10#$NPROC - 1)), got '$PID_ARG'"
check_gpu_options
if ((10#$NPROC > 1)) && [[ $WORKDIR != gs://* && $WORKDIR != /* ]]; then
  warn "--workdir '$WORKDIR' is relative: every machine must see the same shared directory (gs://... or an absolute path on a shared filesystem)"
fi

gpu_main_args --coordinator_address="$COORD" --num_processes="$NPROC" --process_id="$PID_ARG"

# Tools: checked before anything runs.
pick_python
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if ((REQUIRE_GPU_CHECK && !DRY_RUN)); then
    die "nvidia-smi not found on PATH (--require-gpu-check)"
  fi
  warn "nvidia-smi not found on PATH; relying on JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} to find the GPUs"
elif ((!DRY_RUN)); then
  if gpu_list=$(nvidia-smi -L 2>&1); then
    printf 'process %s/%s on %s:\n%s\n' "$PID_ARG" "$NPROC" "$(hostname 2>/dev/null || echo '?')" "$gpu_list" >&2
  elif ((REQUIRE_GPU_CHECK)); then
    die "nvidia-smi failed: ${gpu_list//$'\n'/ }"
  else
    warn "nvidia-smi failed: ${gpu_list//$'\n'/ }"
  fi
fi
check_gpu_data_dir
gpu_preflight $((10#$NPROC))

exec_gpu_main
