#!/usr/bin/env bash
# Cloud TPU VM pod slice (several hosts): the same code, wheels and command on every worker.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b BUCKET=gs://my-data WORK_BUCKET=gs://my-hns-work
#   bash launch/tpu_pod.sh setup                 # ship code, install identical wheels, mount buckets
#   bash launch/tpu_pod.sh run --config configs/imagenet2012.py:arch=resnet50 \
#       --workdir /mnt/vpns-work/in1k_r50        # same command on all workers, VPNS_DISTRIBUTED=1
#   bash launch/tpu_pod.sh logs                  # (DETACH=1 runs) follow worker 0's log
#   bash launch/tpu_pod.sh stop                  # end vpns_jax processes on all workers
#   DRY_RUN=1 bash launch/tpu_pod.sh setup       # (or --dry-run first) print every command, run none
#
# Every gcloud call targets --worker=all (except reading back worker 0's lock file and log): a pod
# program hangs or crashes when a host is missing or runs other versions.
# Environment:
#   TPU_NAME, ZONE        the TPU VM (required); PROJECT optional (else gcloud's default)
#   BUCKET                gs://NAME with the data, mounted READ-ONLY with gcsfuse (and its caches) at
#                         $MOUNT on every worker: $MOUNT/tensorflow_datasets, $MOUNT/weights
#   WORK_BUCKET           gs://NAME for workdirs (checkpoints, metrics, results), default $BUCKET;
#                         must have hierarchical namespace (HNS, checked): mounted read-write at
#                         $WORK_MOUNT with gcsfuse's metadata caches off (see launch/README.md for why)
#   MOUNT, WORK_MOUNT     mount points, default /mnt/vpns and /mnt/vpns-work; a rerun on a new VM with
#                         the same --workdir resumes
#   LOCAL_DATA            optional datasets (space-separated TFDS names) copied from
#                         $BUCKET/tensorflow_datasets to each worker's disk at setup; run then
#                         reads ~/tensorflow_datasets (faster than through the mount)
#   FUSE_CACHE_MB         gcsfuse file cache (data mount) on the worker's disk, default 20000
#   LOCK                  a pip lock file to install everywhere; default: resolved once on worker 0
#                         (`pip install .[tpu]`, `pip freeze`), written to launch/requirements-tpu.lock
#   DETACH=1              run under nohup (log ~/vpns_run.log on each worker) instead of streaming
#   DRY_RUN=1             print the commands (gcloud here, and what each worker would run), run none
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="vpns_jax"          # relative to the worker's home
REMOTE_VENV="vpns_venv"
MOUNT="${MOUNT:-/mnt/vpns}"
WORK_MOUNT="${WORK_MOUNT:-/mnt/vpns-work}"
FUSE_CACHE_MB="${FUSE_CACHE_MB:-20000}"
DRY_RUN="${DRY_RUN:-0}"
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi

die() { echo "[tpu_pod] $*" >&2; exit 1; }

# x CMD ARGS...: run a command, or with DRY_RUN=1 print it (shell-quoted, one line, prefixed '+ ').
x() {
  if [ "$DRY_RUN" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
# xs 'PIPELINE': the same for a shell pipeline given as one string.
xs() {
  if [ "$DRY_RUN" = 1 ]; then printf '+ %s\n' "$1"; else bash -c "$1"; fi
}

# ---------------------------------------------------------------- run on the workers themselves
worker_number() {  # this worker's index in the slice (TPU VM metadata), or ? off a TPU VM
  curl -fs -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || echo '?'
}

worker_setup() {  # args: lock file; env: BUCKET, WORK_BUCKET, MOUNT, WORK_MOUNT, FUSE_CACHE_MB, LOCAL_DATA
  local lock="$1" py="$REMOTE_VENV/bin/python" ds
  cd "$HOME"
  if [ "$DRY_RUN" = 1 ] || [ ! -x "$py" ]; then x python3 -m venv "$REMOTE_VENV"; fi
  x "$py" -m pip install -q --upgrade pip
  if [ -n "$lock" ]; then
    x "$py" -m pip install -q -r "$lock"
    x "$py" -m pip install -q --no-deps -e "$REMOTE_DIR"
  else
    x "$py" -m pip install -q -e "${REMOTE_DIR}[tpu]"
  fi
  if [ -n "${BUCKET:-}" ]; then
    if [ "$DRY_RUN" = 1 ] || ! command -v gcsfuse >/dev/null; then
      xs "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
      xs "echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
      xs "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse"
    fi
    xs "sudo mkdir -p $MOUNT $WORK_MOUNT && sudo chown $(id -u):$(id -g) $MOUNT $WORK_MOUNT"
    # Data: read-only, cached (stat/type caches without expiry, file cache on the local disk).
    if [ "$DRY_RUN" = 1 ] || ! mountpoint -q "$MOUNT"; then
      x gcsfuse -o ro --implicit-dirs --metadata-cache-ttl-secs=-1 \
        --cache-dir=/tmp/gcsfuse-cache --file-cache-max-size-mb="$FUSE_CACHE_MB" \
        "${BUCKET#gs://}" "$MOUNT"
    fi
    # Workdirs: read-write on a hierarchical-namespace bucket (atomic directory renames, which orbax's
    # checkpoint commit relies on), metadata caches off so every worker sees what the others wrote.
    if [ "$DRY_RUN" = 1 ] || ! mountpoint -q "$WORK_MOUNT"; then
      x gcsfuse --metadata-cache-ttl-secs=0 --metadata-cache-negative-ttl-secs=0 \
        "${WORK_BUCKET#gs://}" "$WORK_MOUNT"
    fi
    for ds in ${LOCAL_DATA:-}; do
      x mkdir -p "$HOME/tensorflow_datasets/$ds"
      x gcloud storage rsync -r "$BUCKET/tensorflow_datasets/$ds" "$HOME/tensorflow_datasets/$ds"
    done
  fi
  if [ "$DRY_RUN" = 1 ]; then
    xs "echo VPNS_ENV_HASH \$($py -m pip freeze --exclude-editable | sha256sum | cut -c1-16) worker=\$(worker_number) \$(hostname)"
  else
    echo "VPNS_ENV_HASH $("$py" -m pip freeze --exclude-editable | sha256sum | cut -c1-16)" \
      "worker=$(worker_number) $(hostname)"
  fi
}

worker_run() {  # args: vpns_jax.main arguments; env: MOUNT, LOCAL_DATA, DETACH
  local py="$HOME/$REMOTE_VENV/bin/python"
  if [ "$DRY_RUN" = 1 ]; then x cd "$HOME/$REMOTE_DIR"; else cd "$HOME/$REMOTE_DIR"; fi
  export VPNS_DISTRIBUTED=1
  if [ -n "${LOCAL_DATA:-}" ]; then
    export TFDS_DATA_DIR="$HOME/tensorflow_datasets"
  else
    export TFDS_DATA_DIR="$MOUNT/tensorflow_datasets"
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ export VPNS_DISTRIBUTED=1 TFDS_DATA_DIR=$TFDS_DATA_DIR"
    if [ "${DETACH:-0}" = 1 ]; then
      echo "+ nohup $(printf '%q ' "$py" -m vpns_jax.main "$@")> $HOME/vpns_run.log 2>&1 &"
    else
      x "$py" -m vpns_jax.main "$@"
    fi
  elif [ "${DETACH:-0}" = 1 ]; then
    nohup "$py" -m vpns_jax.main "$@" > "$HOME/vpns_run.log" 2>&1 &
    echo "[tpu_pod] $(hostname): started pid $! (log ~/vpns_run.log)"
  else
    exec "$py" -m vpns_jax.main "$@"
  fi
}

# ---------------------------------------------------------------- run on your machine
# report_env_hashes EXPECTED_WORKERS < setup output: every worker must print the same VPNS_ENV_HASH as
# worker 0; name the workers that differ or did not report, by worker number. Returns 1 if any.
report_env_hashes() {
  local expected="$1" ref bad="" missing="" w line
  local -A hash_of=()
  while read -r line; do
    [[ "$line" =~ VPNS_ENV_HASH\ ([0-9a-f]+)\ worker=([0-9?]+) ]] || continue
    hash_of["${BASH_REMATCH[2]}"]="${BASH_REMATCH[1]}"
  done
  ref="${hash_of[0]:-}"
  for ((w = 0; w < expected; w++)); do
    if [ -z "${hash_of[$w]:-}" ]; then
      missing+=" $w"
    elif [ "${hash_of[$w]}" != "$ref" ]; then
      bad+=" $w(${hash_of[$w]})"
    fi
  done
  if [ -n "$missing" ]; then
    echo "[tpu_pod] no environment report from worker(s)$missing: rerun setup" >&2
  fi
  if [ -n "$bad" ]; then
    echo "[tpu_pod] worker(s)$bad have a different Python environment from worker 0 ($ref): rerun setup" >&2
  fi
  [ -z "$missing$bad" ]
}

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with zone/project
  local sub="$1"; shift
  x gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

remote_env() {  # the environment the worker-side subcommands need, shell-quoted
  printf 'BUCKET=%q WORK_BUCKET=%q MOUNT=%q WORK_MOUNT=%q FUSE_CACHE_MB=%q LOCAL_DATA=%q DETACH=%q' \
    "${BUCKET:-}" "${WORK_BUCKET:-}" "$MOUNT" "$WORK_MOUNT" "$FUSE_CACHE_MB" "${LOCAL_DATA:-}" \
    "${DETACH:-0}"
}

on_all() {  # SUBCOMMAND ARGS...: run this script's worker-side subcommand on every worker
  local cmd
  cmd="$(remote_env) bash ~/$REMOTE_DIR/launch/tpu_pod.sh $(printf '%q ' "$@")"
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$cmd"
  if [ "$DRY_RUN" = 1 ]; then  # what each worker would then run
    env BUCKET="${BUCKET:-}" WORK_BUCKET="${WORK_BUCKET:-}" MOUNT="$MOUNT" WORK_MOUNT="$WORK_MOUNT" \
      FUSE_CACHE_MB="$FUSE_CACHE_MB" LOCAL_DATA="${LOCAL_DATA:-}" DETACH="${DETACH:-0}" DRY_RUN=1 \
      bash "$ROOT/launch/tpu_pod.sh" "$@" | sed 's/^+ /+ [each worker] /'
  fi
}

worker_count() {  # hosts of the slice (one network endpoint per worker)
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --format=json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["networkEndpoints"]))'
}

check_hns() {  # the workdir bucket must have hierarchical namespace (atomic folder renames)
  local bucket="$1"
  if [ "$DRY_RUN" = 1 ]; then x gcloud storage buckets describe "$bucket" --format=json; return; fi
  gcloud storage buckets describe "$bucket" --format=json | python3 -c '
import json, sys
b = json.load(sys.stdin)
sys.exit(0 if (b.get("hierarchical_namespace") or b.get("hierarchicalNamespace") or {}).get("enabled") else 1)
' || die "WORK_BUCKET=$bucket has no hierarchical namespace: gcsfuse renames a directory of a flat bucket" \
        "object by object, so an interrupted checkpoint commit could look complete. Create one with" \
        "gcloud storage buckets create gs://NAME --location=REGION --uniform-bucket-level-access" \
        "--enable-hierarchical-namespace, and set WORK_BUCKET=gs://NAME (see launch/README.md)"
}

setup() {
  local pkg lock_local out workers
  [ -z "${BUCKET:-}" ] || check_hns "$WORK_BUCKET"
  if [ "$DRY_RUN" = 1 ]; then pkg=/tmp/vpns_jax.XXXXXX.tar.gz; else pkg="$(mktemp -t vpns_jax.XXXXXX.tar.gz)"; fi
  # The tracked files as they are in your working tree (commit or not), nothing else.
  xs "git -C $(printf '%q' "$ROOT") ls-files -z | tar -C $(printf '%q' "$ROOT") --null -czf $pkg -T -"
  gcloud_tpu scp "$pkg" "$TPU_NAME:vpns_jax.tar.gz" --worker=all
  x rm -f "$pkg"
  gcloud_tpu ssh "$TPU_NAME" --worker=all \
    --command="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/vpns_jax.tar.gz -C ~/$REMOTE_DIR"

  lock_local="${LOCK:-$ROOT/launch/requirements-tpu.lock}"
  if [ ! -f "$lock_local" ]; then
    echo "[tpu_pod] resolving the TPU environment once on worker 0 -> $lock_local" >&2
    gcloud_tpu ssh "$TPU_NAME" --worker=0 --command="bash ~/$REMOTE_DIR/launch/tpu_pod.sh _worker_setup '' >/dev/null && ~/$REMOTE_VENV/bin/python -m pip freeze --exclude-editable > ~/vpns_requirements.lock"
    gcloud_tpu scp "$TPU_NAME:vpns_requirements.lock" "$lock_local" --worker=0
  fi
  gcloud_tpu scp "$lock_local" "$TPU_NAME:vpns_requirements.lock" --worker=all

  if [ "$DRY_RUN" = 1 ]; then
    on_all _worker_setup vpns_requirements.lock
    echo "+ (compare every worker's VPNS_ENV_HASH with worker 0's)"
    return
  fi
  out="$(on_all _worker_setup vpns_requirements.lock | tee /dev/stderr)"
  workers="$(worker_count)"
  report_env_hashes "$workers" <<<"$out" || die "setup failed (see above)"
  echo "[tpu_pod] all $workers workers have the same environment" >&2
}

main() {
  local cmd="${1:-}"
  shift || true
  WORK_BUCKET="${WORK_BUCKET:-${BUCKET:-}}"
  case "$cmd" in
    _worker_setup) worker_setup "${1:-}" ; return ;;
    _worker_run) worker_run "$@" ; return ;;
    _report_env_hashes) report_env_hashes "$@" ; return ;;
  esac
  [ -n "${TPU_NAME:-}" ] && [ -n "${ZONE:-}" ] || die "set TPU_NAME and ZONE (and BUCKET=gs://...)"
  case "$cmd" in
    setup) setup ;;
    run) [ -n "${BUCKET:-}" ] || [ -n "${LOCAL_DATA:-}" ] || die "set BUCKET=gs://... (data and workdir)"
         on_all _worker_run "$@" ;;
    logs) gcloud_tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 200 -f ~/vpns_run.log" ;;
    stop) gcloud_tpu ssh "$TPU_NAME" --worker=all --command="pkill -f '[v]pns_jax.main' || true" ;;
    *) die "usage: $0 [--dry-run] setup | run ARGS... | logs | stop   (see the top of this file)" ;;
  esac
}

main "$@"
