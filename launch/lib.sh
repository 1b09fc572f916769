# shellcheck shell=bash
# Helpers shared by the launch scripts in this directory (tpu_vm.sh,
# gpu_single.sh, gpu_multi.sh). This file is not a program and is not
# executable: each script sources it right after `set -euo pipefail`, relative
# to the script's own location, so it works from any current directory:
#
#   # shellcheck source-path=SCRIPTDIR source=lib.sh
#   source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
#
# (launch/.shellcheckrc lets a plain `shellcheck launch/X.sh` follow it.)
#
# It sets
#   PROG         the script's name, prefixed to every message
#   SCRIPT_FILE  the script itself: its header comment is what --help prints
#   REPO_ROOT    the checkout the scripts belong to (the parent of launch/)
# and defines the functions below. Functions that read or set the scripts'
# option variables (DRY_RUN, CONFIG_ARGS, EXTRA, MAIN_ARGS, ...) say so.

PROG=${0##*/}
SCRIPT_FILE=${BASH_SOURCE[1]:-$0}
LAUNCH_DIR=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=${LAUNCH_DIR%/*}

# ---------------------------------------------------------------- messages

# Print the header comment of the calling script (not of this file).
usage() {
  local line
  while IFS= read -r line; do
    case $line in
      '#!'*) continue ;;
      '#'*) line=${line#\#}; printf '%s\n' "${line# }" ;;
      *) break ;;
    esac
  done <"$SCRIPT_FILE"
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

warn() {
  printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

info() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# ----------------------------------------------------------------- quoting

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

# Shell-quote a whole command line.
qcmd() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

# -------------------------------------------------------------- running

# Show a command line: on stdout under --dry-run (when it is not run), else on
# stderr after "+ " (as it is run). Reads DRY_RUN.
show_cmd() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(qcmd "$@")"
  else
    printf '+ %s\n' "$(qcmd "$@")" >&2
  fi
}

# Run a command, or print it under --dry-run. Reads DRY_RUN.
run() {
  show_cmd "$@"
  ((DRY_RUN)) || "$@"
}

# ---------------------------------------------------------------- options

# Print the usage and exit 0 if -h or --help comes before any `--`, whatever
# else the command line holds.
handle_help() {
  local a
  for a in "$@"; do
    case $a in
      --) break ;;
      -h | --help) usage; exit 0 ;;
    esac
  done
}

# is_one_of WORD LIST...: whether WORD is one of LIST.
is_one_of() {
  local word=$1 w
  shift
  for w in "$@"; do
    [[ $w == "$word" ]] && return 0
  done
  return 1
}

# parse_args "$@": the command line loop of the scripts. `--opt VALUE` and
# `--opt=VALUE` both work. The script defines the arrays
#   FLAG_OPTS        options without a value
#   VALUE_OPTS       options with a value
#   DASH_VALUE_OPTS  those of VALUE_OPTS whose value may start with '-'
# and the functions
#   set_opt NAME [VALUE]  called for each option in order (a flag: no VALUE)
# and, if it takes arguments other than options (tpu_vm.sh: its command),
#   other_arg ARG         called for every other argument, in order
# (without other_arg, any other argument is an error: "unknown argument").
# The arguments after `--` go to the array EXTRA.
parse_args() {
  local arg name val has_val
  EXTRA=()
  while (($# > 0)); do
    arg=$1
    shift
    case $arg in
      --) EXTRA+=("$@"); break ;;
      --*=*) name=${arg%%=*} val=${arg#*=} has_val=1 ;;
      *) name=$arg val="" has_val=0 ;;
    esac
    if is_one_of "$name" ${FLAG_OPTS[@]+"${FLAG_OPTS[@]}"}; then
      ((has_val)) && die "$name takes no value"
      set_opt "$name"
    elif is_one_of "$name" ${VALUE_OPTS[@]+"${VALUE_OPTS[@]}"}; then
      if ((!has_val)); then
        (($# > 0)) || die "$name needs a value"
        val=$1
        shift
        if [[ $val == -* ]] && ! is_one_of "$name" ${DASH_VALUE_OPTS[@]+"${DASH_VALUE_OPTS[@]}"}; then
          die "$name needs a value (got '$val')"
        fi
      fi
      set_opt "$name" "$val"
    elif declare -F other_arg >/dev/null; then
      other_arg "$arg"
    else
      die "unknown argument: $arg (see --help)"
    fi
  done
}

# Append the words of --config-args (CONFIG_ARGS) and then the arguments after
# `--` (EXTRA) to MAIN_ARGS, the arguments of smope_jax.main.
add_config_args() {
  local words
  if [[ -n $CONFIG_ARGS ]]; then
    read -r -a words <<<"$CONFIG_ARGS"
    MAIN_ARGS+=(${words[@]+"${words[@]}"})
  fi
  MAIN_ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
}

# ---------------------------------------------------------- data directory
# Every script takes --data-dir DIR, the prepared TFDS datasets, passes it on
# as --config.data_dir=DIR and refuses to start a run when DIR is missing
# where the run reads it.

# Refuse --config.data_dir among the overrides in MAIN_ARGS: it would hide
# --data-dir from the checks. Reads MAIN_ARGS.
refuse_config_data_dir() {
  local a
  for a in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
    case $a in
      --config.data_dir | --config.data_dir=*) die "give the data directory with --data-dir, not $a" ;;
    esac
  done
}

# check_gcs_dir gs://DIR OPTION HINT: stop unless `gcloud storage ls` lists
# DIR, saying what to do (HINT) or to fix OPTION; under --dry-run, print that
# command instead. Reads DRY_RUN.
check_gcs_dir() {
  local dir=$1 option=$2 hint=$3 err
  if ((DRY_RUN)); then
    show_cmd gcloud storage ls "$dir"
    return 0
  fi
  err=$(gcloud storage ls "$dir" 2>&1 >/dev/null) ||
    die "$option $dir not found (gcloud storage ls: ${err//$'\n'/ }): $hint, or fix $option"
}

# The hint for a missing data directory.
DATA_HINT="prepare the datasets there first (python launch/prepare_data.py --data_dir=DIR NAME...)"

# -------------------------------------------------- the GPU scripts' part
# Options, checks and the final command that gpu_single.sh and gpu_multi.sh
# share. Each lists these options in its FLAG_OPTS / VALUE_OPTS, calls
# gpu_option_defaults before parse_gpu_args and hands them to set_gpu_opt.

# Defaults of the shared GPU options.
# shellcheck disable=SC2034  # the variables are the calling script's
gpu_option_defaults() {
  CONFIG="" WORKDIR="" DATA_DIR="" GPUS="" CONFIG_ARGS="" PY=${PYTHON:-}
  MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.9}
  PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
  DRY_RUN=0 SKIP_PREFLIGHT=0
}

# set_gpu_opt NAME [VALUE]: one of the shared GPU options.
# shellcheck disable=SC2034  # the variables are the calling script's
set_gpu_opt() {
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --skip-preflight) SKIP_PREFLIGHT=1 ;;
    --preallocate) PREALLOCATE=true ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --data-dir) DATA_DIR=$2 ;;
    --gpus) GPUS=$2 ;;
    --config-args) CONFIG_ARGS=$2 ;;
    --python) PY=$2 ;;
    --mem-fraction) MEM_FRACTION=$2 ;;
  esac
}

# --help, then parse_args "$@" (no other arguments), then --config,
# --workdir and --data-dir are required.
parse_gpu_args() {
  handle_help "$@"
  parse_args "$@"
  [[ -n $CONFIG ]] || die "--config is required (see --help)"
  [[ -n $WORKDIR ]] || die "--workdir is required (see --help)"
  [[ -n $DATA_DIR ]] || die "--data-dir is required: the directory of the prepared TFDS datasets (see --help)"
}

# gpu_main_args [FLAGS...]: the arguments of smope_jax.main, --config,
# --workdir, FLAGS, --data-dir as --config.data_dir, then the overrides (none
# of which may set data_dir). Sets MAIN_ARGS.
gpu_main_args() {
  MAIN_ARGS=()
  add_config_args
  refuse_config_data_dir
  MAIN_ARGS=(--config="$CONFIG" --workdir="$WORKDIR" "$@" --config.data_dir="$DATA_DIR"
    ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
}

# Stop unless --data-dir exists here, where the run reads it: a directory on
# this machine, or gs://... as `gcloud storage ls` sees it (without gcloud on
# PATH only a warning). Nothing is checked under --dry-run. Reads DATA_DIR.
check_gpu_data_dir() {
  ((!DRY_RUN)) || return 0
  if [[ $DATA_DIR == gs://* ]]; then
    if command -v gcloud >/dev/null 2>&1; then
      check_gcs_dir "$DATA_DIR" --data-dir "$DATA_HINT"
    else
      warn "gcloud not found on PATH: cannot check that $DATA_DIR exists"
    fi
  elif [[ ! -d $DATA_DIR ]]; then
    die "--data-dir '$DATA_DIR' not found on $(hostname 2>/dev/null || echo this machine): $DATA_HINT, or fix --data-dir"
  fi
}

# Check --gpus, --mem-fraction and XLA_PYTHON_CLIENT_PREALLOCATE.
check_gpu_options() {
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
}

# PY: --python, else $PYTHON, else python3, else python. Outside a dry run it
# must be found.
pick_python() {
  if [[ -z $PY ]]; then
    if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
  fi
  if ((!DRY_RUN)); then
    command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found (use --python)"
  fi
}

# Run `PY -m smope_jax.main MAIN_ARGS` in place of the script, in the GPU
# environment (CUDA_VISIBLE_DEVICES from --gpus, the XLA memory settings,
# JAX_PLATFORMS=cuda unless set, this checkout on PYTHONPATH); under --dry-run
# print the command and exit 0.
exec_gpu_main() {
  local env=(env)
  [[ -n $GPUS ]] && env+=(CUDA_VISIBLE_DEVICES="$GPUS")
  env+=(
    XLA_PYTHON_CLIENT_PREALLOCATE="$PREALLOCATE"
    XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
    JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
    PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    PYTHONUNBUFFERED=1
  )
  local cmd=("${env[@]}" "$PY" -m smope_jax.main "${MAIN_ARGS[@]}")
  show_cmd "${cmd[@]}"
  if ((DRY_RUN)); then
    exit 0
  fi
  exec "${cmd[@]}"
}

# ------------------------------------------------------------ the preflight
# Before a run starts (on Cloud TPU: before a VM is created or used), the
# scripts compile every jitted step of the run for its accelerators on this
# machine with `python -m smope_jax.preflight` and the run's --config and
# overrides, and refuse a run that does not fit in device memory or does not
# compile. --skip-preflight (SKIP_PREFLIGHT=1) skips it.

# Whether the preflight is to run (status 0); if skipped, say so.
preflight_wanted() {
  if ((SKIP_PREFLIGHT)); then
    info "preflight skipped (--skip-preflight)"
    return 1
  fi
}

# run_preflight TARGET [DIR [FLAG...]]: run the preflight for TARGET, with
# FLAGs, in DIR (default:
# here), this checkout first on PYTHONPATH, its output on stderr, and return
# if the run fits. Else stop: exit status 3 with its verdict line (does not
# fit, does not compile) as the error, or 2 with its error line (bad flag or
# config, compiler extra missing). Under --dry-run, print the command. Reads
# CONFIG, CONFIG_ARGS, EXTRA, PY, DRY_RUN.
run_preflight() {
  local target=$1 dir=${2:-} words=() shown summary rc=0 verdict error last
  shift $(($# < 2 ? $# : 2))
  [[ -z $CONFIG_ARGS ]] || read -r -a words <<<"$CONFIG_ARGS"
  local cmd=(env PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    "$PY" -m smope_jax.preflight --config="$CONFIG" --target="$target" "$@"
    ${words[@]+"${words[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
  shown=$(qcmd "${cmd[@]}")
  [[ -z $dir ]] || shown="cd $(q "$dir") && $shown"
  if ((DRY_RUN)); then
    printf '%s\n' "$shown"
    return 0
  fi
  info "preflight: compiling the run for $target on this machine before it starts (--skip-preflight skips this)"
  printf '+ %s\n' "$shown" >&2
  # Show the output as it comes; keep the last verdict, error and other line.
  summary=$( (if [[ -n $dir ]]; then cd "$dir" || exit 2; fi; exec "${cmd[@]}" </dev/null) 2>&1 | {
    verdict="" error="" last=""
    while IFS= read -r line || [[ -n $line ]]; do
      printf '%s\n' "$line" >&2
      case $line in
        'preflight: '*) verdict=$line ;;
        'error: '*) error=$line ;;
      esac
      [[ -z ${line//[[:space:]]/} ]] || last=$line
    done
    printf '%s\n%s\n%s\n' "$verdict" "$error" "$last"
  }) || rc=$?
  { IFS= read -r verdict; IFS= read -r error; IFS= read -r last; } <<<"$summary"
  case $rc in
    0) ;;
    3)
      info "the preflight refuses this run: stopping before anything is created or started (--skip-preflight to go ahead anyway)"
      printf '%s: error: %s\n' "$PROG" "${verdict:-$last}" >&2
      exit 3
      ;;
    2)
      error=${error:-$last}
      die "preflight: ${error#error: }"
      ;;
    *) die "the preflight failed (exit status $rc): ${last:-no output}; fix that, or pass --skip-preflight" ;;
  esac
}

# gpu_preflight HOSTS: the preflight for gpu:MODELxN, MODEL that of the GPUs
# used here (nvidia-smi), N = HOSTS x their count (all hosts alike). Skipped,
# with a note, without nvidia-smi or for a model with no device description.
# Reads GPUS, CUDA_VISIBLE_DEVICES and what run_preflight reads.
gpu_preflight() {
  local hosts=$1 out name model="" m n i all=() names=() ids=()
  preflight_wanted || return 0
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    info "preflight skipped: without nvidia-smi the GPU model is unknown"
    return 0
  elif ! out=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1); then
    warn "preflight skipped: nvidia-smi --query-gpu=name failed: ${out//$'\n'/ }"
    return 0
  fi
  while IFS= read -r name; do
    [[ -z $name ]] || all+=("$name")
  done <<<"$out"
  # The GPUs used: --gpus, else CUDA_VISIBLE_DEVICES, else all. Indices pick
  # their models; UUIDs only count.
  names=(${all[@]+"${all[@]}"}) n=${#all[@]}
  IFS=, read -r -a ids <<<"${GPUS:-${CUDA_VISIBLE_DEVICES:-}}"
  if ((${#ids[@]} > 0)); then
    n=${#ids[@]}
    if [[ ${ids[*]} =~ ^[0-9\ ]+$ ]]; then
      names=()
      for i in "${ids[@]}"; do
        ((10#$i >= ${#all[@]})) || names+=("${all[10#$i]}")
      done
    fi
  fi
  for name in ${names[@]+"${names[@]}"}; do
    case $name in
      *H100*) m=h100 ;;
      *A100*80GB*) m=a100-80gb ;;
      *A100*40GB*) m=a100-40gb ;;
      *)
        warn "preflight skipped: no device description is known for GPU '$name' (known: H100, A100 40GB, A100 80GB)"
        return 0
        ;;
    esac
    [[ -z $model || $m == "$model" ]] || { warn "preflight skipped: GPUs of two models ($model, $m)"; return 0; }
    model=$m
  done
  [[ -n $model ]] || { warn "preflight skipped: nvidia-smi lists none of the GPUs used"; return 0; }
  # Held against the share of each GPU the run may allocate.
  local target="gpu:${model}x$((n * hosts))"
  ((hosts == 1)) || target+="/$hosts"
  run_preflight "$target" "" --memory_fraction="$MEM_FRACTION"
}
