#!/usr/bin/env bash
# Cloud TPU VM pod slice (several hosts): the same code, wheels and command on every worker.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-bucket
#   bash launch/tpu_pod.sh setup                 # ship code, install identical wheels, mount bucket
#   bash launch/tpu_pod.sh run --config configs/imagenet2012.py:arch=resnet50 \
#       --workdir /mnt/vpns/workdirs/in1k_r50    # same command on all workers, VPNS_DISTRIBUTED=1
#   bash launch/tpu_pod.sh logs                  # (DETACH=1 runs) follow worker 0's log
#   bash launch/tpu_pod.sh stop                  # end vpns_jax processes on all workers
#
# Every gcloud call targets --worker=all (except reading back worker 0's lock file and log): a pod
# program hangs or crashes when a host is missing or runs other versions.
# Environment:
#   TPU_NAME, ZONE        the TPU VM (required); PROJECT optional (else gcloud's default)
#   BUCKET                gs://NAME, mounted with gcsfuse at $MOUNT on every worker (setup, run)
#   MOUNT                 mount point, default /mnt/vpns; data under $MOUNT/tensorflow_datasets,
#                         workdirs under $MOUNT/workdirs so a rerun on a new VM resumes
#   LOCAL_DATA            optional datasets (space-separated TFDS names) copied from
#                         $BUCKET/tensorflow_datasets to each worker's disk at setup; run then
#                         reads ~/tensorflow_datasets (faster than through the mount)
#   FUSE_CACHE_MB         gcsfuse file cache on the worker's disk, default 20000
#   LOCK                  a pip lock file to install everywhere; default: resolved once on worker 0
#                         (`pip install .[tpu]`, `pip freeze`), written to launch/requirements-tpu.lock
#   DETACH=1              run under nohup (log ~/vpns_run.log on each worker) instead of streaming
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="vpns_jax"          # relative to the worker's home
REMOTE_VENV="vpns_venv"
MOUNT="${MOUNT:-/mnt/vpns}"
FUSE_CACHE_MB="${FUSE_CACHE_MB:-20000}"

die() { echo "[tpu_pod] $*" >&2; exit 1; }

# ---------------------------------------------------------------- run on the workers themselves
worker_setup() {  # args: lock file; env: BUCKET, MOUNT, FUSE_CACHE_MB, LOCAL_DATA
  local lock="$1"
  cd "$HOME"
  [ -x "$REMOTE_VENV/bin/python" ] || python3 -m venv "$REMOTE_VENV"
  "$REMOTE_VENV/bin/python" -m pip install -q --upgrade pip
  if [ -n "$lock" ]; then
    "$REMOTE_VENV/bin/python" -m pip install -q -r "$lock"
    "$REMOTE_VENV/bin/python" -m pip install -q --no-deps -e "$REMOTE_DIR"
  else
    "$REMOTE_VENV/bin/python" -m pip install -q -e "${REMOTE_DIR}[tpu]"
  fi
  if [ -n "${BUCKET:-}" ]; then
    if ! command -v gcsfuse >/dev/null; then
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
        | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" \
        | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    sudo mkdir -p "$MOUNT" && sudo chown "$(id -u):$(id -g)" "$MOUNT"
    if ! mountpoint -q "$MOUNT"; then
      # --rename-dir-limit: orbax commits a checkpoint by renaming its temporary directory.
      gcsfuse --implicit-dirs --rename-dir-limit=200000 \
        --cache-dir=/tmp/gcsfuse-cache --file-cache-max-size-mb="$FUSE_CACHE_MB" \
        "${BUCKET#gs://}" "$MOUNT"
    fi
    for ds in ${LOCAL_DATA:-}; do
      mkdir -p "$HOME/tensorflow_datasets/$ds"
      gcloud storage rsync -r "$BUCKET/tensorflow_datasets/$ds" "$HOME/tensorflow_datasets/$ds"
    done
  fi
  echo "VPNS_ENV_HASH $("$REMOTE_VENV/bin/python" -m pip freeze --exclude-editable | sha256sum | cut -c1-16) $(hostname)"
}

worker_run() {  # args: vpns_jax.main arguments; env: MOUNT, LOCAL_DATA, DETACH
  cd "$HOME/$REMOTE_DIR"
  export VPNS_DISTRIBUTED=1
  if [ -n "${LOCAL_DATA:-}" ]; then
    export TFDS_DATA_DIR="$HOME/tensorflow_datasets"
  else
    export TFDS_DATA_DIR="$MOUNT/tensorflow_datasets"
  fi
  if [ "${DETACH:-0}" = 1 ]; then
    nohup "$HOME/$REMOTE_VENV/bin/python" -m vpns_jax.main "$@" > "$HOME/vpns_run.log" 2>&1 &
    echo "[tpu_pod] $(hostname): started pid $! (log ~/vpns_run.log)"
  else
    exec "$HOME/$REMOTE_VENV/bin/python" -m vpns_jax.main "$@"
  fi
}

# ---------------------------------------------------------------- run on your machine
gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with zone/project
  local sub="$1"; shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_all() {  # run a shell command on every worker
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

remote_env() {  # the environment the worker-side subcommands need, shell-quoted
  printf 'BUCKET=%q MOUNT=%q FUSE_CACHE_MB=%q LOCAL_DATA=%q DETACH=%q' \
    "${BUCKET:-}" "$MOUNT" "$FUSE_CACHE_MB" "${LOCAL_DATA:-}" "${DETACH:-0}"
}

setup() {
  local pkg lock_local lock_remote="" out hashes
  pkg="$(mktemp -t vpns_jax.XXXXXX.tar.gz)"
  # The tracked files as they are in your working tree (commit or not), nothing else.
  git -C "$ROOT" ls-files -z | tar -C "$ROOT" --null -czf "$pkg" -T -
  gcloud_tpu scp "$pkg" "$TPU_NAME:vpns_jax.tar.gz" --worker=all
  rm -f "$pkg"
  on_all "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/vpns_jax.tar.gz -C ~/$REMOTE_DIR"

  lock_local="${LOCK:-$ROOT/launch/requirements-tpu.lock}"
  if [ ! -f "$lock_local" ]; then
    echo "[tpu_pod] resolving the TPU environment once on worker 0 -> $lock_local" >&2
    gcloud_tpu ssh "$TPU_NAME" --worker=0 --command="bash ~/$REMOTE_DIR/launch/tpu_pod.sh _worker_setup '' >/dev/null && ~/$REMOTE_VENV/bin/python -m pip freeze --exclude-editable > ~/vpns_requirements.lock"
    gcloud_tpu scp "$TPU_NAME:vpns_requirements.lock" "$lock_local" --worker=0
  fi
  gcloud_tpu scp "$lock_local" "$TPU_NAME:vpns_requirements.lock" --worker=all
  lock_remote="vpns_requirements.lock"

  out="$(on_all "$(remote_env) bash ~/$REMOTE_DIR/launch/tpu_pod.sh _worker_setup $lock_remote" | tee /dev/stderr)"
  hashes="$({ grep -o 'VPNS_ENV_HASH [0-9a-f]*' <<<"$out" || true; } | sort -u | wc -l)"
  [ "$hashes" = 1 ] || die "workers ended up with different Python environments ($hashes): rerun setup"
  echo "[tpu_pod] all workers have the same environment" >&2
}

run() {
  local args
  args="$(printf '%q ' "$@")"
  on_all "$(remote_env) bash ~/$REMOTE_DIR/launch/tpu_pod.sh _worker_run $args"
}

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    _worker_setup) worker_setup "${1:-}" ; return ;;
    _worker_run) worker_run "$@" ; return ;;
  esac
  [ -n "${TPU_NAME:-}" ] && [ -n "${ZONE:-}" ] || die "set TPU_NAME and ZONE (and BUCKET=gs://...)"
  case "$cmd" in
    setup) setup ;;
    run) [ -n "${BUCKET:-}" ] || [ -n "${LOCAL_DATA:-}" ] || die "set BUCKET=gs://... (data and workdir)"
         run "$@" ;;
    logs) gcloud_tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 200 -f ~/vpns_run.log" ;;
    stop) on_all "pkill -f '[v]pns_jax.main' || true" ;;
    *) die "usage: $0 setup | run ARGS... | logs | stop   (see the top of this file)" ;;
  esac
}

main "$@"
