#!/usr/bin/env bash
# Usage: launch/tpu_vm.sh COMMAND --project=P --zone=Z --tpu-name=NAME [options] [-- MAIN_ARGS...]
#        launch/tpu_vm.sh preflight --accelerator-type=T --config=CFG [options] [-- MAIN_ARGS...]
#
# Runs smope_jax on a Cloud TPU VM: a single host (v4-8, v5litepod-8, ...) or a
# pod slice with several workers (v4-32, v5litepod-16, ...). Every gcloud call
# names --project and --zone explicitly; nothing is read from gcloud config.
# The run gets SMOPE_DISTRIBUTED=auto: every worker calls
# jax.distributed.initialize(), which finds the slice (or the single host)
# from the VM's metadata, as multi-host checkpoints need.
#
# Commands:
#   preflight  compile every step of the run for --accelerator-type ahead of
#            time, here on this workstation (no gcloud, no TPU needed):
#            `python -m smope_jax.preflight --config=CFG --target=tpu:T` with
#            the --config-args and the arguments after `--`, run in this
#            checkout (v5litepod-N is passed as v5e-N). It ends with one
#            verdict line; a run that does not fit in TPU memory or does not
#            compile is refused with that line as the error (exit status 3).
#            `all` runs it first; `run` and, given --config, `create` run it
#            before they create or use the TPU (--skip-preflight skips it).
#            Without the TPU compiler packages (the project's extra
#            preflight-tpu) it stops, naming what to pip install
#   create   create the TPU VM (gcloud compute tpus tpu-vm create); given
#            --config, after the preflight (without, it cannot check a run)
#   setup    copy the project to every worker and install it there: a
#            `git archive` tarball of this checkout (tracked files, including
#            uncommitted edits) sent with `tpu-vm scp --worker=all`, or
#            `git clone --repo-url` on every worker; then a Python >= 3.11
#            venv with `pip install -r requirements.txt` and jax[tpu] (on a
#            fresh VM it first waits for the boot-time apt jobs); with
#            --weights-cache, copies the cached weights to every worker
#   run      preflight (for the VM's type unless --accelerator-type is
#            given), check --data-dir, then start `python -m smope_jax.main
#            --config=... --workdir=... --config.data_dir=...` on all workers
#            at once (nohup, in the background, log to ~/LOG_FILE)
#   logs     stream the log of one worker (default 0) until the run ends
#   status   show on every worker whether the run is going or how it ended
#   stop     kill the run on every worker
#   copy     copy a local (on-VM) workdir from worker 0 to --copy-to
#            (gs://... via `gcloud storage cp` on the VM, else scp to here)
#   delete   delete the TPU VM
#   all      preflight, create, setup, run, logs, copy (local workdir),
#            delete; the VM is deleted also when a step fails or on Ctrl-C
#            (unless --keep-vm); exits with the exit status of the run
#
# Options (--opt VALUE and --opt=VALUE both work):
#   --project P            GCP project (required)
#   --zone Z               zone, e.g. us-central2-b (required)
#   --tpu-name NAME        TPU VM name (required)
#   --accelerator-type T   e.g. v4-8, v4-32, v5litepod-16 (required by
#                          create/all/preflight)
#   --runtime-version V    TPU software version; default by type: v2/v3/v4
#                          tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
#                          v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --spot                 create a Spot VM
#   --create-flags "..."   extra flags for `tpu-vm create` (e.g. "--network=n
#                          --service-account=SA --internal-ips")
#   --ssh-flags "..."      extra flags for `tpu-vm ssh` and `scp` (e.g.
#                          "--internal-ip" or "--strict-host-key-checking=no")
#   --iap                  reach the workers through Identity-Aware Proxy (VMs
#                          without external IP): ssh and scp then run as
#                          `gcloud alpha compute tpus tpu-vm ssh/scp
#                          --tunnel-through-iap`, since only the alpha track
#                          has that flag (create, describe and delete stay GA)
#   --config CFG           config path on the VM, relative to the project
#                          checkout, e.g. configs/cifar100.py or
#                          configs/imagenet_r.py:tasks=20 (required by
#                          run/all/preflight); the preflight reads it from
#                          this checkout
#   --workdir DIR          gs://bucket/path, or a path on worker 0 (relative to
#                          the home directory there); a pod slice (more than
#                          one worker) needs gs:// (required by run/all)
#   --data-dir DIR         the prepared TFDS datasets, passed as
#                          --config.data_dir: gs://bucket/path, or a path on
#                          every worker (relative to the home directory there;
#                          `all` needs gs://, a new VM has no datasets). Before
#                          starting, `run` and `all` refuse a missing one:
#                          gs:// by `gcloud storage ls` here, a path by `test -d`
#                          on every worker (required by run/all)
#   --weights-cache GS     gs://... copy of a weights cache (~/.cache/smope_jax
#                          with its .sha256 files); `setup` copies it into
#                          ~/.cache/smope_jax on every worker. Without it the
#                          workers download presets themselves (they need
#                          internet access)
#   --config-args "..."    extra overrides, e.g. "--config.seed=3 --config.dtype=bfloat16";
#                          arguments after `--` are passed on verbatim as well
#   --copy-to DEST         where `copy` puts a local workdir: gs://... or a local
#                          directory here (required by `all` with a local workdir)
#   --repo-url URL         `git clone URL` on every worker instead of sending a
#                          tarball of this checkout
#   --ref REF              git commit/branch/tag to ship or check out
#                          (default: this checkout's working tree / the clone's
#                          default branch)
#   --worker N             worker whose log `logs` streams (default 0)
#   --remote-dir D         project directory on the VM (default smope_jax)
#   --venv D               virtualenv on the VM (default smope_venv)
#   --log-file F           log file on the VM (default smope_run.log)
#   --keep-vm              `all`: do not delete the VM at the end
#   --skip-preflight       create or run without the preflight
#   --python PY            Python for the preflight here (default: $PYTHON,
#                          else python3, else python)
#   --dry-run              print the commands instead of running them (gcloud
#                          need not be installed)
#   -h, --help             print this help
#
# Examples:
#   launch/tpu_vm.sh all --project=my-proj --zone=us-central2-b --tpu-name=smope \
#     --accelerator-type=v4-8 --config=configs/cifar100.py \
#     --workdir=gs://my-bucket/smope/cifar100 --data-dir=gs://my-bucket/tfds \
#     --config-args="--config.dtype=bfloat16"
#   launch/tpu_vm.sh preflight --accelerator-type=v5litepod-8 --config=configs/cifar100.py \
#     --config-args="--config.dtype=bfloat16"
#   launch/tpu_vm.sh create --project=my-proj --zone=us-central2-b --tpu-name=smope --accelerator-type=v4-32 --spot
#   launch/tpu_vm.sh setup  --project=my-proj --zone=us-central2-b --tpu-name=smope
#   launch/tpu_vm.sh run    --project=my-proj --zone=us-central2-b --tpu-name=smope \
#     --config=configs/imagenet_r.py:tasks=20 --workdir=gs://my-bucket/smope/inr20 \
#     --data-dir=gs://my-bucket/tfds -- --config.seed=3
#   launch/tpu_vm.sh logs   --project=my-proj --zone=us-central2-b --tpu-name=smope
#   launch/tpu_vm.sh delete --project=my-proj --zone=us-central2-b --tpu-name=smope
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

# jax version range used when requirements.txt cannot be read.
DEFAULT_JAX_SPEC='>=0.10.2,<0.11'

# A path on the VM: absolute as given, relative ones under $HOME (expanded there).
rpath() {
  case $1 in
    /*) q "$1" ;;
    *)
      # shellcheck disable=SC2016  # $HOME is for the remote shell to expand
      printf '"$HOME"/%s' "$(q "$1")"
      ;;
  esac
}

# rflag --flag= PATH: the argument --flag=PATH for the remote shell, a relative
# path on the VM under $HOME there, gs://... as given.
rflag() {
  case $2 in
    gs://* | /*) q "$1$2" ;;
    *) printf '%s%s' "$1" "$(rpath "$2")" ;;
  esac
}

# ---------------------------------------------------------------- arguments
CMD=""
PROJECT="" ZONE="" TPU_NAME="" ACCEL="" RUNTIME="" CONFIG="" WORKDIR=""
CONFIG_ARGS="" COPY_TO="" REPO_URL="" REF="" WORKER=0 CREATE_FLAGS=""
SSH_FLAGS="" REMOTE_DIR=smope_jax VENV=smope_venv LOG_FILE=smope_run.log
DATA_DIR="" WEIGHTS_CACHE="" SPOT=0 KEEP_VM=0 IAP=0 DRY_RUN=0 SKIP_PREFLIGHT=0
PY=${PYTHON:-}

FLAG_OPTS=(--dry-run --spot --keep-vm --iap --skip-preflight)
VALUE_OPTS=(--project --zone --tpu-name --accelerator-type --runtime-version --config
  --workdir --data-dir --weights-cache --config-args --copy-to --repo-url --ref --worker
  --remote-dir --venv --log-file --create-flags --ssh-flags --python)
DASH_VALUE_OPTS=(--config-args --create-flags --ssh-flags)

set_opt() { # set_opt NAME [VALUE], for parse_args
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --keep-vm) KEEP_VM=1 ;;
    --iap) IAP=1 ;;
    --skip-preflight) SKIP_PREFLIGHT=1 ;;
    --python) PY=$2 ;;
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
    --tpu-name) TPU_NAME=$2 ;;
    --accelerator-type) ACCEL=$2 ;;
    --runtime-version) RUNTIME=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --data-dir) DATA_DIR=$2 ;;
    --weights-cache) WEIGHTS_CACHE=$2 ;;
    --config-args) CONFIG_ARGS=$2 ;;
    --copy-to) COPY_TO=$2 ;;
    --repo-url) REPO_URL=$2 ;;
    --ref) REF=$2 ;;
    --worker) WORKER=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --venv) VENV=$2 ;;
    --log-file) LOG_FILE=$2 ;;
    --create-flags) CREATE_FLAGS=$2 ;;
    --ssh-flags) SSH_FLAGS=$2 ;;
  esac
}

other_arg() { # other_arg ARG, for parse_args: the command
  case $1 in
    -*) die "unknown option: $1 (see --help)" ;;
    *)
      [[ -z $CMD ]] || die "more than one command given: '$CMD' and '$1'"
      CMD=$1
      ;;
  esac
}

handle_help "$@"
parse_args "$@"

case $CMD in
  preflight | create | setup | run | logs | status | stop | copy | delete | all) ;;
  "") die "a command is required: preflight|create|setup|run|logs|status|stop|copy|delete|all (see --help)" ;;
  *) die "unknown command '$CMD': expected preflight|create|setup|run|logs|status|stop|copy|delete|all" ;;
esac

require() { # require VALUE --flag
  [[ -n $1 ]] || die "$2 is required for '$CMD' (see --help)"
}
if [[ $CMD != preflight ]]; then
  require "$PROJECT" --project
  require "$ZONE" --zone
  require "$TPU_NAME" --tpu-name
fi
case $CMD in create | all | preflight) require "$ACCEL" --accelerator-type ;; esac
case $CMD in run | all | preflight) require "$CONFIG" --config ;; esac
case $CMD in run | all | copy) require "$WORKDIR" --workdir ;; esac
case $CMD in run | all) require "$DATA_DIR" --data-dir ;; esac

[[ $CMD == preflight || $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--tpu-name '$TPU_NAME' is not a valid name (lowercase letters, digits and '-', starting with a letter)"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index (0, 1, ...), got '$WORKER'"
for v in "$REMOTE_DIR" "$VENV" "$LOG_FILE"; do
  [[ -n $v && $v != *..* ]] || die "remote paths must be non-empty and must not contain '..': '$v'"
done

# Whether an accelerator type is a slice with several TPU VM hosts (status 0),
# one host (1) or unknown (2). The number after the dash counts TensorCores
# (v2, v3, v4, v5p: 8 per host) or chips (v5e, v6e: at most 8 on one host), so
# more than 8 means several hosts.
is_multi_host() {
  local n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || return 2
  ((n > 8))
}

if [[ -n $ACCEL ]]; then
  [[ $ACCEL =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "--accelerator-type '$ACCEL' does not look like a TPU type (e.g. v4-8, v4-32, v5litepod-16)"
  if [[ -z $RUNTIME ]]; then
    case $ACCEL in
      v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      *) case $CMD in create | all) die "no default runtime version for '$ACCEL': pass --runtime-version" ;; esac ;;
    esac
  fi
fi

WORKDIR_IS_GCS=0
[[ $WORKDIR == gs://* ]] && WORKDIR_IS_GCS=1
case $CMD in
  run | all)
    if ((!WORKDIR_IS_GCS)) && [[ -n $ACCEL ]] && is_multi_host "$ACCEL"; then
      die "--workdir must be gs://... on a pod slice ('$ACCEL' has several workers), got '$WORKDIR'"
    fi
    ;;
esac
if [[ $CMD == all ]] && ((!WORKDIR_IS_GCS)) && [[ -z $COPY_TO ]] && ((!KEEP_VM)); then
  die "--copy-to is required for 'all' with a local --workdir (the VM and its disk are deleted at the end); or use --workdir=gs://..."
fi
if [[ $CMD == copy ]] && ((!WORKDIR_IS_GCS)) && [[ -z $COPY_TO ]]; then
  die "--copy-to is required for 'copy' with a local --workdir"
fi
if [[ -n $COPY_TO && $COPY_TO != gs://* && -e $COPY_TO && ! -d $COPY_TO ]]; then
  die "--copy-to '$COPY_TO' exists and is not a directory"
fi
DATA_IS_GCS=0
[[ $DATA_DIR == gs://* ]] && DATA_IS_GCS=1
if [[ $CMD == all ]] && ((!DATA_IS_GCS)); then
  die "--data-dir must be gs://... for 'all': a new VM has no datasets on its disk (or run create, setup, put the data on every worker, then run)"
fi
[[ -z $WEIGHTS_CACHE || $WEIGHTS_CACHE == gs://* ]] ||
  die "--weights-cache must be gs://..., got '$WEIGHTS_CACHE'"
[[ " $SSH_FLAGS " != *" --tunnel-through-iap"[\ =]* ]] ||
  die "--ssh-flags: GA 'gcloud compute tpus tpu-vm ssh' has no --tunnel-through-iap; use --iap (ssh and scp through 'gcloud alpha')"
if ((IAP)) && [[ " $SSH_FLAGS " == *" --internal-ip "* ]]; then
  die "--iap and --ssh-flags=--internal-ip exclude each other"
fi

MAIN_ARGS=()
add_config_args
refuse_config_data_dir

# Tools: checked before anything is done. Under --dry-run nothing is run.
if ((!DRY_RUN)) && [[ $CMD != preflight ]]; then
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
  if [[ $CMD == setup || $CMD == all ]] && [[ -z $REPO_URL ]]; then
    command -v git >/dev/null 2>&1 || die "git not found on PATH (needed for git archive; or pass --repo-url)"
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$REPO_ROOT is not a git checkout: pass --repo-url to clone the project on the VM"
  fi
fi
# The preflight's Python, for the commands that run it (create: with --config).
case $CMD in
  preflight | all | run) ((SKIP_PREFLIGHT)) || pick_python ;;
  create) [[ -z $CONFIG ]] || ((SKIP_PREFLIGHT)) || pick_python ;;
esac

GC=(gcloud compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")
# ssh and scp: GA, or the alpha track with --tunnel-through-iap under --iap.
SSH_GC=("${GC[@]}")
SSHX=()
if ((IAP)); then
  SSH_GC=(gcloud alpha compute tpus tpu-vm)
  SSHX=(--tunnel-through-iap)
fi
if [[ -n $SSH_FLAGS ]]; then
  read -r -a words <<<"$SSH_FLAGS"
  SSHX+=(${words[@]+"${words[@]}"})
fi

ssh_cmd() { # ssh_cmd WORKER REMOTE_COMMAND
  run "${SSH_GC[@]}" ssh "$TPU_NAME" "${WHERE[@]}" ${SSHX[@]+"${SSHX[@]}"} --worker="$1" --command="$2"
}

scp_cmd() { # scp_cmd WORKER SCP_ARGS...
  local worker=$1
  shift
  run "${SSH_GC[@]}" scp "$@" "${WHERE[@]}" ${SSHX[@]+"${SSHX[@]}"} --worker="$worker"
}

RDIR=$(rpath "$REMOTE_DIR")
RVENV=$(rpath "$VENV")
RLOG=$(rpath "$LOG_FILE")

jax_spec() {
  local line spec=""
  if [[ -r $REPO_ROOT/requirements.txt ]]; then
    while IFS= read -r line; do
      line=${line%%#*}
      line=${line//[[:space:]]/}
      if [[ $line =~ ^jax([<>=!~].*)$ ]]; then
        spec=${BASH_REMATCH[1]}
        break
      fi
    done <"$REPO_ROOT/requirements.txt"
  fi
  [[ $spec =~ ^[-0-9A-Za-z.,*\<\>=!~]+$ ]] || spec=$DEFAULT_JAX_SPEC
  printf '%s' "$spec"
}

# ----------------------------------------------------------------- commands
# tpu_preflight TYPE: the preflight for accelerator type TYPE (v5litepod-N as
# v5e-N), in this checkout, where --config is relative to the checkout as it
# is on the VM. An unknown TYPE (empty): stop, or under --dry-run say so.
tpu_preflight() {
  local type=$1
  preflight_wanted || return 0
  if [[ -z $type ]]; then
    ((DRY_RUN)) || die "cannot tell the accelerator type of $TPU_NAME (gcloud ... describe failed) for the preflight: pass --accelerator-type, or --skip-preflight"
    info "the preflight's target is the accelerator type that describe prints: pass --accelerator-type to see its command"
    return 0
  fi
  [[ $type != v5litepod-* ]] || type=v5e-${type#v5litepod-}
  run_preflight "tpu:$type" "$REPO_ROOT"
}

do_preflight() {
  tpu_preflight "$ACCEL"
}

do_create() {
  if [[ -n $CONFIG ]]; then
    tpu_preflight "$ACCEL"
  else
    info "no --config: creating $TPU_NAME without the preflight"
  fi
  create_vm
}

create_vm() {
  local args=("${GC[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$RUNTIME")
  ((SPOT)) && args+=(--spot)
  if [[ -n $CREATE_FLAGS ]]; then
    local extra
    read -r -a extra <<<"$CREATE_FLAGS"
    args+=(${extra[@]+"${extra[@]}"})
  fi
  run "${args[@]}"
}

# Stop unless the --weights-cache copy, if any, exists.
check_weights_cache() {
  [[ -z $WEIGHTS_CACHE ]] || check_gcs_dir "$WEIGHTS_CACHE" --weights-cache "copy ~/.cache/smope_jax there first"
}

do_setup() {
  [[ $CMD != setup ]] || check_weights_cache
  if [[ -n $REPO_URL ]]; then
    local clone
    clone="rm -rf $RDIR && git clone --quiet $(q "$REPO_URL") $RDIR"
    [[ -n $REF ]] && clone+=" && git -C $RDIR checkout --quiet $(q "$REF")"
    ssh_cmd all "$clone"
  else
    local ref=$REF tmp tarball remote_tar=smope_jax-src.tar.gz
    if ((DRY_RUN)); then
      tmp=${TMPDIR:-/tmp}/smope_jax-launch.XXXXXX
      [[ -n $ref ]] || ref=HEAD
    else
      tmp=$(mktemp -d "${TMPDIR:-/tmp}/smope_jax-launch.XXXXXX")
      # shellcheck disable=SC2064  # expand $tmp now
      trap "rm -rf $(q "$tmp"); trap - RETURN" RETURN
      if [[ -z $ref ]]; then
        # A commit of the working tree (tracked files) without touching it.
        ref=$(git -C "$REPO_ROOT" stash create 2>/dev/null || true)
        if [[ -n $ref ]]; then
          info "shipping the working tree including uncommitted changes to tracked files"
        else
          ref=HEAD
          if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -n 1) ]]; then
            warn "could not snapshot uncommitted changes (git stash create failed): shipping HEAD only"
          fi
        fi
        if [[ -n $(git -C "$REPO_ROOT" ls-files --others --exclude-standard 2>/dev/null | head -n 1) ]]; then
          warn "untracked files are not shipped (git add them to include them)"
        fi
      fi
    fi
    tarball=$tmp/$remote_tar
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$ref"
    scp_cmd all "$tarball" "$TPU_NAME:$remote_tar"
    ssh_cmd all "rm -rf $RDIR.new && mkdir -p $RDIR.new && tar -xzf $remote_tar -C $RDIR.new && rm -f $remote_tar && rm -rf $RDIR && mv $RDIR.new $RDIR"
  fi

  local spec
  spec=$(jax_spec)
  local install
  install=$(
    cat <<EOF
set -euo pipefail
# A freshly booted VM runs cloud-init and the apt-daily jobs, which hold the
# apt locks for minutes: the first apt-get waits for them (10 minutes at most).
apt_busy() {
  { command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet apt-daily.service apt-daily-upgrade.service; } ||
    pgrep -x 'apt|apt-get|dpkg' >/dev/null 2>&1
}
APT_WAITED=0
apt_get() {
  if [ "\$APT_WAITED" = 0 ]; then
    echo "[setup] \$(hostname): waiting for the boot-time apt jobs"
    if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1 || true; fi
    for _ in \$(seq 120); do apt_busy || break; sleep 5; done
    APT_WAITED=1
  fi
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -qq "\$@"
}
PY=""
for c in python3.13 python3.12 python3.11; do if command -v "\$c" >/dev/null 2>&1; then PY=\$c; break; fi; done
if [ -z "\$PY" ]; then
  echo "[setup] \$(hostname): installing python3.11 (jax needs Python >= 3.11)"
  apt_get update && apt_get install python3.11 python3.11-venv
  PY=python3.11
fi
if [ ! -x $RVENV/bin/python ]; then
  "\$PY" -m venv $RVENV || { apt_get install "\$PY-venv" && "\$PY" -m venv $RVENV; }
fi
$RVENV/bin/python -m pip install -q -U pip
$RVENV/bin/python -m pip install -q -r $RDIR/requirements.txt
$RVENV/bin/python -m pip install -q -U "jax[tpu]$spec"
echo "[setup] \$(hostname): ready, jax and python versions: \$($RVENV/bin/python -c "import jax, platform; print(jax.__version__, platform.python_version())")"
EOF
  )
  ssh_cmd all "$install"
  if [[ -n $WEIGHTS_CACHE ]]; then
    ssh_cmd all "mkdir -p ~/.cache/smope_jax && gcloud storage rsync --recursive $(q "$WEIGHTS_CACHE") ~/.cache/smope_jax"
  fi
}

do_run() {
  # Without --accelerator-type: the VM's type, for the preflight and for a
  # local workdir (one worker only).
  local acc=$ACCEL
  local describe=("${GC[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(acceleratorType)')
  if [[ -z $acc ]] && { ((!SKIP_PREFLIGHT)) || ((!WORKDIR_IS_GCS)); }; then
    if ((DRY_RUN)); then
      ((SKIP_PREFLIGHT)) || show_cmd "${describe[@]}"
    else
      acc=$("${describe[@]}" 2>/dev/null || true)
      acc=${acc##*/}
    fi
    if ((!WORKDIR_IS_GCS)) && [[ -n $acc ]] && is_multi_host "$acc"; then
      die "--workdir must be gs://... on a pod slice ('$acc' has several workers), got '$WORKDIR'"
    fi
  fi
  tpu_preflight "$acc"
  check_data_dir
  start_run
}

# Start the run on every worker, in the background.
start_run() {
  local main
  main="$RVENV/bin/python -m smope_jax.main $(q "--config=$CONFIG") $(rflag --workdir= "$WORKDIR") $(rflag --config.data_dir= "$DATA_DIR")"
  if ((${#MAIN_ARGS[@]} > 0)); then
    main+=" $(qcmd "${MAIN_ARGS[@]}")"
  fi
  # The job: runs in the project directory, records its exit status.
  local job
  job="cd $RDIR || exit 1; echo \"[launch] \$(date -u) \$(hostname)\"; export PYTHONUNBUFFERED=1 SMOPE_DISTRIBUTED=auto; set -x; $main; { rc=\$?; set +x; } 2>/dev/null; echo \"\$rc\" > $RLOG.rc; echo \"[launch] \$(date -u) exit status \$rc\"; exit \"\$rc\""
  local remote
  remote="if [ -f $RLOG.pid ] && kill -0 \"\$(cat $RLOG.pid)\" 2>/dev/null; then echo \"\$(hostname): a run is already going (pid \$(cat $RLOG.pid)); use the stop command first\" >&2; exit 1; fi; rm -f $RLOG.rc; setsid nohup bash -c $(q "$job") > $RLOG 2>&1 < /dev/null & echo \$! > $RLOG.pid; echo \"\$(hostname): started pid \$!, log $LOG_FILE\""
  ssh_cmd all "$remote"
}

# Stop unless --data-dir exists where the run reads it: gs://... listed from
# here, a path on the VM tested on every worker.
check_data_dir() {
  if ((DATA_IS_GCS)); then
    check_gcs_dir "$DATA_DIR" --data-dir "$DATA_HINT"
  else
    ssh_cmd all "test -d $(rpath "$DATA_DIR") || { echo \"\$(hostname): --data-dir $(q "$DATA_DIR") not found: put the prepared TFDS datasets there or use gs://...\" >&2; exit 1; }" ||
      die "--data-dir $DATA_DIR is missing on a worker: the run was not started"
  fi
}

do_logs() {
  ssh_cmd "$WORKER" "if [ -f $RLOG.pid ]; then tail -n +1 -F --pid=\"\$(cat $RLOG.pid)\" $RLOG; else cat $RLOG; fi"
}

do_status() {
  ssh_cmd all "if [ -f $RLOG.pid ] && kill -0 \"\$(cat $RLOG.pid)\" 2>/dev/null; then echo \"\$(hostname): running (pid \$(cat $RLOG.pid))\"; elif [ -f $RLOG.rc ]; then echo \"\$(hostname): finished, exit status \$(cat $RLOG.rc)\"; elif [ -f $RLOG.pid ]; then echo \"\$(hostname): stopped\"; else echo \"\$(hostname): not started\"; fi"
}

do_stop() {
  ssh_cmd all "if [ -f $RLOG.pid ] && kill -- -\"\$(cat $RLOG.pid)\" 2>/dev/null; then echo \"\$(hostname): stopped\"; else echo \"\$(hostname): not running\"; fi"
}

do_copy() {
  if ((WORKDIR_IS_GCS)); then
    info "workdir $WORKDIR is already in Cloud Storage: nothing to copy"
    return 0
  fi
  require "$COPY_TO" --copy-to
  if [[ $COPY_TO == gs://* ]]; then
    ssh_cmd 0 "gcloud storage cp -r $(rpath "$WORKDIR") $(q "$COPY_TO")"
  else
    # scp: a relative path on the VM is relative to the home directory there.
    ((DRY_RUN)) || mkdir -p "$COPY_TO"
    scp_cmd 0 --recurse "$TPU_NAME:$WORKDIR" "$COPY_TO"
  fi
}

do_delete() {
  run "${GC[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
}

wait_for_run() {
  # Stream worker 0's log; if the connection drops before the run ends, reattach.
  local tries=0 rc=""
  while :; do
    do_logs || true
    if ((DRY_RUN)); then
      ssh_cmd 0 "cat $RLOG.rc"
      RUN_RC=0
      return 0
    fi
    rc=$("${SSH_GC[@]}" ssh "$TPU_NAME" "${WHERE[@]}" ${SSHX[@]+"${SSHX[@]}"} --worker=0 --command="cat $RLOG.rc 2>/dev/null || true" 2>/dev/null | tail -n 1 || true)
    if [[ $rc =~ ^[0-9]+$ ]]; then
      RUN_RC=$rc
      return 0
    fi
    tries=$((tries + 1))
    ((tries < 20)) || { warn "lost the log stream 20 times; giving up waiting"; RUN_RC=1; return 0; }
    warn "log stream ended before the run did; reattaching in 30 s"
    sleep 30
  done
}

cleanup_all() {
  local rc=${1:-$?}
  trap - EXIT INT TERM
  if ((!KEEP_VM)); then
    warn "deleting TPU VM $TPU_NAME after an error or interruption (use --keep-vm to keep it)"
    do_delete || warn "could not delete $TPU_NAME: delete it by hand: $(qcmd "${GC[@]}" delete "$TPU_NAME" "${WHERE[@]}")"
  else
    warn "TPU VM $TPU_NAME is kept (--keep-vm); delete it with: $0 delete --project=$PROJECT --zone=$ZONE --tpu-name=$TPU_NAME"
  fi
  exit "$rc"
}

do_all() {
  # Before the VM exists: the preflight, the data (gs:// for `all`) and the
  # weights copy.
  tpu_preflight "$ACCEL"
  check_data_dir
  check_weights_cache
  create_vm
  if ((!DRY_RUN)); then
    trap cleanup_all EXIT
    trap 'cleanup_all 130' INT
    trap 'cleanup_all 143' TERM
  fi
  do_setup
  start_run
  RUN_RC=0
  wait_for_run
  ((RUN_RC == 0)) || warn "the run exited with status $RUN_RC"
  if ((!WORKDIR_IS_GCS)) && [[ -n $COPY_TO ]]; then
    do_copy
  fi
  ((DRY_RUN)) || trap - EXIT INT TERM
  if ((KEEP_VM)); then
    info "TPU VM $TPU_NAME is kept (--keep-vm)"
  else
    do_delete
  fi
  return "$RUN_RC"
}

((DRY_RUN)) && info "dry run: printing the commands instead of running them"
"do_$CMD"
