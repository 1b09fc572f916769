#!/usr/bin/env bash
# Usage: launch/gpu_single.sh --config=CFG --workdir=DIR --data-dir=DIR [options] [-- MAIN_ARGS...]
#
# Runs smope_jax on one machine with one or more NVIDIA GPUs: a single process
# drives every visible GPU (no --coordinator_address needed). Run it from
# anywhere; --config and a relative --workdir are taken relative to the
# current directory, and the checkout this script belongs to is put on
# PYTHONPATH.
#
# GPU memory: unless already set in the environment, the run gets
#   XLA_PYTHON_CLIENT_PREALLOCATE=false   (allocate on demand instead of grabbing
#                                          75% of every GPU at start-up)
#   XLA_PYTHON_CLIENT_MEM_FRACTION=.9     (cap per GPU)
#   JAX_PLATFORMS=cuda                    (fail instead of silently using the CPU)
# --preallocate / --mem-fraction override the first two.
#
# Requires nvidia-smi on PATH (checked before anything runs; --skip-gpu-check
# to bypass, e.g. in a container without it). Install JAX with CUDA first:
#   pip install -r requirements.txt && pip install -U "jax[cuda12]>=0.10.2,<0.11"
#
# Options (--opt VALUE and --opt=VALUE both work):
#   --config CFG          config file, e.g. configs/cifar100.py or
#                         configs/imagenet_r.py:tasks=20 (required)
#   --workdir DIR         output directory, local or gs://... (required)
#   --data-dir DIR        prepared TFDS datasets, local or gs://..., passed as
#                         --config.data_dir (required; the run is refused when
#                         DIR does not exist: checked here, gs:// with
#                         `gcloud storage ls` when gcloud is on PATH)
#   --gpus LIST           GPUs to use, sets CUDA_VISIBLE_DEVICES (e.g. 0,1,2,3)
#   --config-args "..."   extra overrides, e.g. "--config.seed=3 --config.batch_size=64";
#                         arguments after `--` are passed on verbatim as well
#   --python PY           Python interpreter (default: $PYTHON, else python3, else python)
#   --preallocate         let JAX preallocate GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE=true)
#   --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, 0 < F <= 1 (default .9)
#   --skip-gpu-check      do not require nvidia-smi
#   --skip-preflight      start without the preflight (see below)
#   --dry-run             print the command instead of running it
#   -h, --help            print this help
#
# Preflight: before the run starts, `python -m smope_jax.preflight
# --config=CFG --target=gpu:MODELxN` (with the same overrides) compiles every
# step of the run for the GPUs used, here: N of them (--gpus, else
# CUDA_VISIBLE_DEVICES, else all), of the model nvidia-smi names (H100 ->
# h100, A100 80GB -> a100-80gb, A100 40GB -> a100-40gb). A run that does not
# fit in GPU memory or does not compile is refused with the preflight's
# verdict (exit status 3). It is skipped, saying so, for other GPU models
# and without nvidia-smi. Without the GPU compiler packages (the project's
# extra preflight-gpu) it stops, naming what to pip install.
#
# Example:
#   launch/gpu_single.sh --config=configs/cifar100.py --workdir=runs/cifar100 \
#     --data-dir=/data/tfds --gpus=0,1 --config-args="--config.seed=3"
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- arguments
gpu_option_defaults
SKIP_GPU_CHECK=0

FLAG_OPTS=(--dry-run --preallocate --skip-gpu-check --skip-preflight)
VALUE_OPTS=(--config --workdir --data-dir --gpus --config-args --python --mem-fraction)
DASH_VALUE_OPTS=(--config-args)

set_opt() { # set_opt NAME [VALUE], for parse_args
  case $1 in
    --skip-gpu-check) SKIP_GPU_CHECK=1 ;;
    *) set_gpu_opt "$@" ;;
  esac
}

parse_gpu_args "$@"
check_gpu_options
# shellcheck disable=SC2119  # no flags besides the shared ones
gpu_main_args

# Tools: checked before anything runs.
pick_python
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if ((DRY_RUN || SKIP_GPU_CHECK)); then
    warn "nvidia-smi not found on PATH"
  else
    die "nvidia-smi not found on PATH: this script needs an NVIDIA driver (or pass --skip-gpu-check)"
  fi
elif ((!DRY_RUN && !SKIP_GPU_CHECK)); then
  gpu_list=$(nvidia-smi -L 2>&1) || die "nvidia-smi failed: ${gpu_list//$'\n'/ }"
  n_gpus=$(grep -c '^GPU ' <<<"$gpu_list" || true)
  ((n_gpus > 0)) || die "nvidia-smi lists no GPU"
  printf '%s\n' "$gpu_list" >&2
  if [[ -n $GPUS ]]; then
    n_used=$(tr ',' '\n' <<<"$GPUS" | grep -c .)
  else
    n_used=$n_gpus
  fi
  printf '%s: using %s GPU(s); the config batch_size is the global batch and must divide by %s\n' \
    "$PROG" "$n_used" "$n_used" >&2
fi
check_gpu_data_dir
gpu_preflight 1

exec_gpu_main
