#!/usr/bin/env bash
# Usage: launch/gpu_single.sh --config=CFG --workdir=DIR [options] [-- MAIN_ARGS...]
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
#   --gpus LIST           GPUs to use, sets CUDA_VISIBLE_DEVICES (e.g. 0,1,2,3)
#   --config-args "..."   extra overrides, e.g. "--config.seed=3 --config.batch_size=64";
#                         arguments after `--` are passed on verbatim as well
#   --python PY           Python interpreter (default: $PYTHON, else python3, else python)
#   --preallocate         let JAX preallocate GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE=true)
#   --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, 0 < F <= 1 (default .9)
#   --skip-gpu-check      do not require nvidia-smi
#   --dry-run             print the command instead of running it
#   -h, --help            print this help
#
# Example:
#   launch/gpu_single.sh --config=configs/cifar100.py --workdir=runs/cifar100 \
#     --gpus=0,1 --config-args="--config.seed=3"
set -euo pipefail

PROG=${0##*/}
case ${BASH_SOURCE[0]} in
  */*) SCRIPT_DIR=$(cd "${BASH_SOURCE[0]%/*}" && pwd) ;;
  *) SCRIPT_DIR=$(pwd) ;;
esac
REPO_ROOT=${SCRIPT_DIR%/*}

usage() {
  local line
  while IFS= read -r line; do
    case $line in
      '#!'*) continue ;;
      '#'*) line=${line#\#}; printf '%s\n' "${line# }" ;;
      *) break ;;
    esac
  done <"${BASH_SOURCE[0]}"
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# Shell-quote one word, leaving it bare when that is safe.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--?[A-Za-z0-9_.-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

qcmd() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

# ---------------------------------------------------------------- arguments
CONFIG="" WORKDIR="" GPUS="" CONFIG_ARGS="" PY=${PYTHON:-}
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.9}
PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
SKIP_GPU_CHECK=0 DRY_RUN=0
EXTRA=()

for a in "$@"; do
  case $a in
    --) break ;;
    -h | --help) usage; exit 0 ;;
  esac
done

while (($# > 0)); do
  arg=$1
  shift
  case $arg in
    --) EXTRA+=("$@"); break ;;
    --*=*) name=${arg%%=*} val=${arg#*=} has_val=1 ;;
    *) name=$arg val="" has_val=0 ;;
  esac
  case $name in
    --dry-run | --preallocate | --skip-gpu-check)
      ((has_val)) && die "$name takes no value"
      case $name in
        --dry-run) DRY_RUN=1 ;;
        --preallocate) PREALLOCATE=true ;;
        --skip-gpu-check) SKIP_GPU_CHECK=1 ;;
      esac
      ;;
    --config | --workdir | --gpus | --config-args | --python | --mem-fraction)
      if ((!has_val)); then
        (($# > 0)) || die "$name needs a value"
        val=$1
        shift
        [[ $val != -* || $name == --config-args ]] || die "$name needs a value (got '$val')"
      fi
      case $name in
        --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;;
        --gpus) GPUS=$val ;;
        --config-args) CONFIG_ARGS=$val ;;
        --python) PY=$val ;;
        --mem-fraction) MEM_FRACTION=$val ;;
      esac
      ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done

[[ -n $CONFIG ]] || die "--config is required (see --help)"
[[ -n $WORKDIR ]] || die "--workdir is required (see --help)"
if [[ -n $GPUS ]]; then
  [[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ || $GPUS =~ ^(GPU|MIG)-[-0-9a-fA-F/]+(,(GPU|MIG)-[-0-9a-fA-F/]+)*$ ]] ||
    die "--gpus must be a comma-separated list of GPU indices or UUIDs (e.g. 0,1,2,3), got '$GPUS'"
fi
[[ $MEM_FRACTION =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
  die "--mem-fraction must be a number in (0, 1], e.g. .9, got '$MEM_FRACTION'"
case $PREALLOCATE in
  true | false) ;;
  *) die "XLA_PYTHON_CLIENT_PREALLOCATE must be true or false, got '$PREALLOCATE'" ;;
esac

if [[ -z $PY ]]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi

MAIN_ARGS=(--config="$CONFIG" --workdir="$WORKDIR")
if [[ -n $CONFIG_ARGS ]]; then
  read -r -a cfg_words <<<"$CONFIG_ARGS"
  MAIN_ARGS+=(${cfg_words[@]+"${cfg_words[@]}"})
fi
MAIN_ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})

# Tools: checked before anything runs.
if ((!DRY_RUN)); then
  command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found (use --python)"
fi
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

ENV=(env)
[[ -n $GPUS ]] && ENV+=(CUDA_VISIBLE_DEVICES="$GPUS")
ENV+=(
  XLA_PYTHON_CLIENT_PREALLOCATE="$PREALLOCATE"
  XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
  JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  PYTHONUNBUFFERED=1
)
CMD=("${ENV[@]}" "$PY" -m smope_jax.main "${MAIN_ARGS[@]}")

if ((DRY_RUN)); then
  printf '%s\n' "$(qcmd "${CMD[@]}")"
  exit 0
fi
printf '+ %s\n' "$(qcmd "${CMD[@]}")" >&2
exec "${CMD[@]}"
