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
  DRY_RUN=0
}

# set_gpu_opt NAME [VALUE]: one of the shared GPU options.
# shellcheck disable=SC2034  # the variables are the calling script's
set_gpu_opt() {
  case $1 in
    --dry-run) DRY_RUN=1 ;;
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
