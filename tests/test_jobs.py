"""torchx jobs (jobs/components.py through pipeline/cli/jobs.py): real local_cwd jobs of 2 nodes x 1 process and of
1 node x 2 processes train the same loss curves; a rank killed mid-run is restarted by torchelastic and the run
resumes; a failing rank fails the job within seconds with its error in `hyrank logs`; the kubernetes and slurm
dryruns hold every field the command set; torchx's errors are one line; the shipped CronJob, crontab and
Dockerfile agree with the project.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_jobs.py            # ~1.5 min on 2 cores
"""

import configparser
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from hyrank.pipeline.cli import main
from hyrank.pipeline.config import load_config
from hyrank.pipeline.data.synth import generate_logs
from hyrank.pipeline.cli.jobs import job_request, torchx_runner, wait_for

from conftest import DEFAULT_CONFIG, ROOT, small_synth

TORCHXCONFIG = ROOT / ".torchxconfig"
DAYS = "2026-11-01..2026-11-02"
# seconds per run on a loaded 2-core machine, not a hang
TIMEOUT_S = 300
SMALL = ["--set=data.batch_size_per_rank=64", "--set=model.options.hidden=[32]", "--set=train.tensorboard=false",
         "--set=features.sequences.0.max_len=32", "--set=features.sequences.1.max_len=8",
         "--set=features.sequences.2.max_len=8",
         "--set=train.min_unit_rows=1",  # each 2000-row day its own unit: the tests compare per-day loss curves
         "--set=embeddings.lr=0.5", "--set=embeddings.init_scale=0"]  # conftest.FAST_SPARSE
# One sharding plan for every topology. TorchRec's planner shards a table table_row_wise across hosts and
# table_wise within one, and a sharded table is initialised shard by shard, so 2x1 and 1x2 would start from other
# weights (measured: first-step losses 0.6578 vs 0.6561); pinned, the two runs are equal bit for bit.
PINNED = "--set=embeddings.sharding={%s}" % ",".join(
    f'{t.name}={{sharding_types=["table_wise"]}}' for t in load_config(DEFAULT_CONFIG).features.tables)


@pytest.fixture(autouse=True)
def _project_torchxconfig(monkeypatch):
    """The repository's .torchxconfig, whatever $HOME holds; submitted from the repository root, as documented."""
    monkeypatch.setenv("TORCHXCONFIG", str(TORCHXCONFIG))
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def logs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobs-data")
    generate_logs(small_synth(num_days=2, rows_per_day=2000), root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_args(data: Path, out_dir: Path) -> list[str]:
    return [f'--set=data.root="{data}"', f'--set=out_dir="{out_dir}"', *SMALL, PINNED]


def _run_local(component: str, args: list[str], log_dir: Path):
    """Run a component on local_cwd through hyrank's runner API; fails with the job's logs unless it succeeds."""
    with torchx_runner() as runner:  # closing it ends the job, should the wait time out
        handle = runner.schedule(job_request(runner, component, args, "local_cwd", f"log_dir={log_dir}"))
        status = wait_for(runner, handle, timeout_s=TIMEOUT_S)
    logs = "".join(p.read_text() for p in sorted(log_dir.glob(f"*/{handle.rsplit('/', 1)[1]}/*/*/combined.log")))
    assert status is not None and status.state.name == "SUCCEEDED", f"{handle}: {status}\n{logs[-4000:]}"
    return handle


def _outputs(out_dir: Path, pattern: str, keys: tuple[str, ...]) -> dict:
    return {p.name: {k: json.loads(p.read_text())[k] for k in keys} for p in sorted(out_dir.glob(pattern))}


# -- real jobs on this machine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_node_of_two(logs_root, tmp_path_factory) -> dict:
    """The reference: train on one node of two ranks; its per-day loss curves."""
    tmp = tmp_path_factory.mktemp("one-node-of-two")
    _run_local("train", ["-j", "1x2", "--days", DAYS, "--", *_run_args(logs_root, tmp / "run")], tmp / "torchx")
    return _outputs(tmp / "run" / "train", "day-*.json", ("losses", "rows"))


@pytest.mark.dist
def test_train_on_two_nodes_of_one_equals_one_node_of_two(logs_root, one_node_of_two, tmp_path):
    """c10d rendezvous between two torchrun agents on localhost (a free port) or one agent with two ranks: the
    same seeded loss curve, step for step."""
    _run_local("train", ["-j", "2x1", "--rdzv_port", str(_free_port()), "--days", DAYS, "--",
                         *_run_args(logs_root, tmp_path / "run")], tmp_path / "torchx")
    curves = _outputs(tmp_path / "run" / "train", "day-*.json", ("losses", "rows"))
    assert list(curves) == ["day-2026-11-01.json", "day-2026-11-02.json"]
    assert all(day["rows"] == 2000 and len(day["losses"]) == 16 for day in curves.values())
    assert curves == one_node_of_two


@pytest.mark.dist
def test_a_killed_rank_is_restarted_and_the_run_ends_as_an_uninterrupted_one(logs_root, one_node_of_two, tmp_path):
    """--max_retries is torchelastic's --max-restarts: SIGKILL a rank after a mid-day checkpoint; its agent restarts
    every rank (TORCHELASTIC_RESTART_COUNT=1), train resumes from the latest checkpoint by itself, and the loss
    curves equal an uninterrupted run's."""
    out = tmp_path / "run"
    with torchx_runner() as runner:
        handle = runner.schedule(job_request(
            runner, "train", ["-j", "1x2", "--max_retries", "1", "--days", DAYS, "--", *_run_args(logs_root, out),
                              "--set=checkpoint.every_steps=4"], "local_cwd", f"log_dir={tmp_path / 'torchx'}"))
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "checkpoints" / "step-000000008").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        ranks = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline") if _is_rank_of(p, str(out))]
        assert len(ranks) == 2, f"ranks of the job: {ranks}"
        os.kill(ranks[0], signal.SIGKILL)
        status = wait_for(runner, handle, timeout_s=TIMEOUT_S)
    logs = "".join(p.read_text() for p in (tmp_path / "torchx").glob("*/*/train/0/combined.log"))
    assert status is not None and status.state.name == "SUCCEEDED", logs[-4000:]
    resumed = re.search(r"\[rank 0\] INFO hyrank.pipeline.train.trainer: resumed from \S+/step-(\d+)", logs)
    assert resumed and int(resumed[1]) >= 8, logs[-4000:]  # from a checkpoint of the killed attempt
    assert _outputs(out / "train", "day-*.json", ("losses", "rows")) == one_node_of_two


def _is_rank_of(cmdline: Path, out_dir: str) -> bool:
    """A worker of the job writing to `out_dir` (not its torchrun agent, not the shell around it)."""
    try:
        argv = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "hyrank.pipeline.cli" in argv and any(out_dir in a for a in argv) and not any("torchrun" in a for a in argv)


@pytest.mark.dist
def test_stream_on_two_nodes_of_one_equals_one_node_of_two(logs_root, tmp_path):
    """Two days of daily retraining: the same losses and the same progressive metrics for either topology."""
    runs = {}
    for j in ("2x1", "1x2"):
        out = tmp_path / j
        _run_local("stream", ["-j", j, "--rdzv_port", str(_free_port()), "--", *_run_args(logs_root, out)],
                   tmp_path / "torchx")
        runs[j] = (_outputs(out / "train", "day-*.json", ("losses",)),
                   _outputs(out / "metrics", "progressive-*.json", ("model_step", "metrics")))
    train, progressive = runs["2x1"]
    assert list(train) == ["day-2026-11-01.json", "day-2026-11-02.json"]
    first, second = progressive.values()
    assert first["metrics"] is None  # the first day of a fresh run has no model before it
    assert second["model_step"] == 16 and 0.5 < second["metrics"]["auc"] < 1
    assert runs["2x1"] == runs["1x2"]


@pytest.mark.dist
def test_a_failing_rank_fails_the_job_in_seconds_with_its_error_in_the_logs(logs_root, tmp_path, capsys):
    """A bad --set fails every rank at once: `hyrank submit` exits 1 naming the rank's error, no hang, and
    `hyrank status` / `hyrank logs` find the ended job from another process (through .torchxconfig's log_dir)."""
    config = tmp_path / ".torchxconfig"
    config.write_text(f"[local_cwd]\nlog_dir = {tmp_path / 'torchx'}\n")
    cmd = [sys.executable, "-m", "hyrank.pipeline.cli", "submit", "--scheduler", "local_cwd", "train", "-j", "2x1",
           "--rdzv_port", str(_free_port()), "--days", "2026-11-01", "--", *_run_args(logs_root, tmp_path / "run"),
           "--set=train.no_such_key=1"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, TORCHXCONFIG=str(config), OMP_NUM_THREADS="1"))
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchx's runner then stops its agents, which stop their ranks
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"a failed rank hung the job:\n{err[-3000:]}")
    seconds = time.monotonic() - started
    assert proc.returncode == 1, err[-3000:]
    assert seconds < 60, f"the job took {seconds:.0f} s to report its failure"
    handle = out.splitlines()[0]
    assert re.fullmatch(r"local_cwd://torchx/hyrank-train-\w+", handle)
    assert f"{handle}: FAILED" in out
    # the rank's own message closes the output, once for both ranks
    errors = [line for line in err.splitlines() if "ERROR hyrank" in line and line.startswith(tuple("0123456789"))]
    assert len(errors) == 1 and "unknown key 'train.no_such_key'" in errors[0], err[-3000:]

    os.environ["TORCHXCONFIG"] = str(config)  # (monkeypatched: restored after the test)
    assert main(["status", handle]) == 0
    assert f"{handle}: FAILED" in capsys.readouterr().out
    assert main(["logs", handle, "--role", "train"]) == 0
    logs = capsys.readouterr().out
    for node in (0, 1):  # one torchrun agent per node, each with its rank's error
        rank_error = rf"^train/{node} \[0\]:.*\[rank [01]\] ERROR hyrank: .*unknown key 'train.no_such_key'"
        assert re.search(rank_error, logs, re.MULTILINE), logs[-3000:]


# -- dryruns: what Kubernetes and Slurm would get -----------------------------------------------------------------


# torchx's note that Volcano's task-level retries are unreliable (the job-level maxRetry and torchelastic remain)
VOLCANO_NOTE = "ignore::UserWarning:torchx.schedulers.kubernetes_scheduler"


@pytest.mark.filterwarnings(VOLCANO_NOTE)
def test_kubernetes_dryrun_is_a_volcano_job_with_every_field_set(capsys):
    assert main(["submit", "--scheduler", "kubernetes", "--dryrun", "stream", "-j", "2x4", "--cpu", "16", "--gpu",
                 "4", "--memMB", "64000", "--env", "NCCL_DEBUG=INFO", "--max_retries", "3", "--rdzv_port", "29555",
                 "--", '--set=out_dir="runs/prod"']) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    spec = job["spec"]
    assert (spec["schedulerName"], spec["queue"], spec["maxRetry"]) == ("volcano", "default", 3)  # .torchxconfig
    assert [t["name"] for t in spec["tasks"]] == ["stream-0", "stream-1"]
    for node, task in enumerate(spec["tasks"]):
        assert (task["replicas"], task["minAvailable"], task["maxRetry"]) == (1, 1, 3)
        assert {(p["event"], p["action"]) for p in task["policies"]} == {("PodEvicted", "RestartJob"),
                                                                       ("PodFailed", "RestartJob")}
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "hyrank:0.1.0-cuda"  # .torchxconfig's cuda_image: the job has GPUs
        assert container["command"][:2] == ["bash", "-c"]
        host = "TORCHX_RANK0_HOST" if node == 0 else "VC_STREAM_0_HOSTS"
        assert shlex.split(container["command"][2]) == [
            "torchrun", "--max-restarts", "3", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"${{{host}:=localhost}}:29555", "--rdzv_id", job["metadata"]["name"], "--nnodes", "2",
            "--nproc_per_node", "4", "--tee", "3", "--role", "", "-m", "hyrank.pipeline.cli", "stream",
            "--config", "jobs/configs/default.toml", "--quiet", '--set=out_dir="runs/prod"']
        assert container["resources"] == {  # torchx requests a little less than the node: the kubelet's share
            "limits": {"cpu": "16000m", "memory": "64000M", "nvidia.com/gpu": "4"},
            "requests": {"cpu": "15900m", "memory": "62976M", "nvidia.com/gpu": "4"}}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NCCL_DEBUG"] == "INFO" and "PATH" not in env  # --env wins over the component's WARN
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a store per rendezvous round (components.py)
        assert container["ports"] == [{"containerPort": 29555, "name": "c10d"}]
        mounts = {m["mountPath"]: (m["name"], m.get("readOnly")) for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert {path: (claims[name], ro) for path, (name, ro) in mounts.items() if name in claims} == {
            "/app/data": ("hyrank-data", True), "/app/runs": ("hyrank-runs", False)}
        assert pod["restartPolicy"] == "Never"


PAPER_SCALE_JOB = ["train", "-j", "8x8", "--gpu", "8", "--cpu", "96", "--memMB", "1000000", "--max_retries", "3",
                   "--config", "jobs/configs/paper_scale.toml", "--days", "2026-01-01..2026-03-11"]


@pytest.mark.filterwarnings(VOLCANO_NOTE)
def test_paper_scale_job_on_8_hosts_of_8_gpus(capsys):
    """The multi-host job of jobs/configs/paper_scale.toml (its header's command), field by field: 8 pods of 8 GPUs
    meeting at one rendezvous, the CUDA image, NCCL's environment, a memory-backed /dev/shm, elastic restarts."""
    assert main(["submit", "--scheduler", "kubernetes", "--dryrun", *PAPER_SCALE_JOB]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    spec = job["spec"]
    assert spec["maxRetry"] == 3  # Volcano resubmits a job that lost a node (a host's failure)
    assert [t["name"] for t in spec["tasks"]] == [f"train-{i}" for i in range(8)]
    torchx_ini = _torchxconfig()["component:jobs/components.py:train"]
    for node, task in enumerate(spec["tasks"]):
        assert (task["replicas"], task["minAvailable"], task["maxRetry"]) == (1, 1, 3)
        assert {(p["event"], p["action"]) for p in task["policies"]} == {("PodEvicted", "RestartJob"),
                                                                       ("PodFailed", "RestartJob")}
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        # the image built with --build-arg FBGEMM=fbgemm-gpu (fbgemm's CUDA kernels), as the Dockerfile says
        assert container["image"] == torchx_ini["cuda_image"] == "hyrank:0.1.0-cuda"
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert f"--build-arg FBGEMM=fbgemm-gpu -t {torchx_ini['cuda_image']} ." in dockerfile
        # every host's torchrun: 8 ranks, one c10d rendezvous on the first pod, torchelastic's restarts of all
        # ranks (train resumes from the latest checkpoint: --resume latest-if-any)
        host = "TORCHX_RANK0_HOST" if node == 0 else "VC_TRAIN_0_HOSTS"
        assert shlex.split(container["command"][2]) == [
            "torchrun", "--max-restarts", "3", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"${{{host}:=localhost}}:29500", "--rdzv_id", job["metadata"]["name"], "--nnodes", "8",
            "--nproc_per_node", "8", "--tee", "3", "--role", "", "-m", "hyrank.pipeline.cli", "train",
            "--config", "jobs/configs/paper_scale.toml", "--days", "2026-01-01..2026-03-11", "--quiet",
            "--resume", "latest-if-any"]
        assert container["resources"]["limits"] == {"cpu": "96000m", "memory": "1000000M", "nvidia.com/gpu": "8"}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # a failed collective ends its rank: a restart
        assert env["NCCL_DEBUG"] == "WARN"
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a rendezvous store per restart round
        # /dev/shm: a memory-backed volume without a size limit, in place of a container's 64 MB (NCCL's
        # shared-memory transport and the loader threads use it; it counts against the pod's memory limit)
        volumes = {v["name"]: v for v in pod["volumes"]}
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"] == {"medium": "Memory"}
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/app/data", "/app/runs"}
    # the config the job runs: the paper's batch per GPU, its async allreduce, and its 4.7 billion rows
    cfg = load_config(ROOT / "jobs" / "configs" / "paper_scale.toml")
    assert cfg.data.batch_size_per_rank == 2048 and cfg.train.allreduce == "async"
    assert sum(t.num_embeddings for t in cfg.features.tables) > 4_000_000_000


@pytest.mark.filterwarnings(VOLCANO_NOTE)
@pytest.mark.parametrize("component", ["train", "stream"])
def test_s3_kubernetes_dryrun_has_data_and_checkpoints_on_object_storage_and_no_shared_volume(component, capsys):
    """Pods that share no volume: the storage locations go to the verb, the credentials come from a Secret as
    environment variables, and .torchxconfig's ReadWriteMany claims are not mounted."""
    args = ["--days", "2026-11-01..2026-11-03"] if component == "train" else ["--export_to", "s3://models/serving"]
    assert main(["submit", "--scheduler", "kubernetes", "--dryrun", component, "-j", "2x2", *args,
                 "--data_root", "s3://logs/clicks", "--checkpoint_dir", "s3://models/run/checkpoints",
                 "--storage_secret", "hyrank-s3", "--", '--set=out_dir="runs/prod"']) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert [t["name"] for t in job["spec"]["tasks"]] == [f"{component}-0", f"{component}-1"]
    for task in job["spec"]["tasks"]:
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        command = shlex.split(container["command"][2])
        assert command[command.index(component) + 1:][-3:] == [
            '--set=data.root="s3://logs/clicks"', '--set=checkpoint.dir="s3://models/run/checkpoints"',
            '--set=out_dir="runs/prod"']
        if component == "stream":
            assert command[command.index("--export-to") + 1] == "s3://models/serving"
        assert container["envFrom"] == [{"secretRef": {"name": "hyrank-s3"}}]
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])  # no ReadWriteMany volume
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/dev/shm"]
    # data on object storage but checkpoints under out_dir: the shared volumes stay
    assert main(["submit", "--scheduler", "kubernetes", "--dryrun", component, "-j", "2x2", *args,
                 "--data_root", "s3://logs/clicks"]) == 0
    pod = yaml.safe_load(capsys.readouterr().out)["spec"]["tasks"][0]["template"]["spec"]
    assert any("persistentVolumeClaim" in v for v in pod["volumes"])


@pytest.mark.filterwarnings(VOLCANO_NOTE)
def test_s3_kubernetes_dryrun_of_an_export_from_and_to_object_storage_mounts_nothing(capsys):
    assert main(["submit", "--scheduler", "kubernetes", "--dryrun", "export", "--checkpoint",
                 "s3://models/run/checkpoints/step-000000100", "--out", "s3://models/serving",
                 "--storage_secret", "hyrank-s3"]) == 0
    pod = yaml.safe_load(capsys.readouterr().out)["spec"]["tasks"][0]["template"]["spec"]
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "hyrank-s3"}}]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_s3_storage_secret_is_kubernetes_only(caplog):
    assert main(["submit", "--scheduler", "slurm", "--dryrun", "train", "--days", "2026-11-01",
                 "--storage_secret", "hyrank-s3"]) == 2
    assert "storage_secret names a Kubernetes Secret" in caplog.text


def test_a_cpu_job_runs_the_cpu_image_without_nccl():
    with torchx_runner() as runner:
        info = job_request(runner, "train", ["-j", "2x2", "--days", "2026-11-01"], "kubernetes")
    (role,) = info._app.roles
    assert role.image == "hyrank:0.1.0" and "NCCL_DEBUG" not in role.env


def test_slurm_dryrun_is_an_sbatch_job_with_every_field_set():
    with torchx_runner() as runner:
        request = job_request(runner, "train", ["-j", "2x2", "--cpu", "8", "--gpu", "2", "--memMB", "32000", "--env",
                                                "A=1", "--max_retries", "2", "--days", "2026-11-01..2026-11-30",
                                                "--eval_day", "2026-12-01", "--", "--set=train.lr=0.01"],
                              "slurm", "time=2:00:00").request
    assert list(request.replicas) == ["train-0", "train-1"]
    for replica in request.replicas.values():
        assert replica.sbatch_opts == {"requeue": None, "partition": "gpu", "time": "2:00:00", "ntasks-per-node": "1",
                                       "cpus-per-task": "8", "mem": "32000", "gpus-per-task": "2"}
        assert replica.entrypoint == "bash" and replica.args[0] == "-c"
        assert shlex.split(replica.args[1]) == [
            "torchrun", "--max-restarts", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            "${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500", "--rdzv_id", "${app_id}", "--nnodes", "2",
            "--nproc_per_node", "2", "--tee", "3", "--role", "", "-m", "hyrank.pipeline.cli", "train",
            "--config", "jobs/configs/default.toml", "--days", "2026-11-01..2026-11-30", "--quiet",
            "--eval-day", "2026-12-01", "--resume", "latest-if-any", "--set=train.lr=0.01"]
        assert replica.env["A"] == "1"
        # this checkout's Python runs the job on every node, activated or not
        assert replica.env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    script = request.materialize()
    assert "export TORCHX_MAX_RETRIES=2" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


@pytest.mark.parametrize("argv,message", [
    (["--scheduler", "nope", "train", "--days", "2026-11-01"], "unknown scheduler 'nope': one of "),
    (["--scheduler", "kubernetes", "train", "--days", "2026-11-01", "--image", ""], "runs containers and the job "
                                                                                    "names no image"),
    (["--scheduler", "kubernetes", "train", "--days", "2026-11-01", "-h", "huge"], "No named resource found for "
                                                                                  "`huge`"),
    (["--scheduler", "kubernetes", "train", "--days", "2026-11-01", "-j", "2by8"], "Invalid format for -j"),
    (["--scheduler", "slurm", "train", "--days", "2026-11-01", "--mounts", "kind=volume"], "unknown mount option"),
    (["--scheduler", "local_cwd", "stream", "--", "--nproc-per-node", "2"], "-j NNODESxNPROC sets the ranks"),
    (["--scheduler", "local_cwd", "nowhere.py:train"], "nowhere.py:train: nowhere.py does not exist"),
])
def test_torchx_errors_are_one_line(argv, message, caplog):
    assert main(["submit", "--dryrun", *argv]) == 2
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert message in record.getMessage() and "\n" not in record.getMessage() and record.exc_info is None


def test_a_missing_run_option_names_the_option(tmp_path, monkeypatch, caplog):
    empty = tmp_path / ".torchxconfig"
    empty.write_text("")
    monkeypatch.setenv("TORCHXCONFIG", str(empty))  # no [kubernetes] queue
    assert main(["submit", "--scheduler", "kubernetes", "--dryrun", "stream"]) == 2
    assert "Required run option: queue" in caplog.text and "--scheduler-args queue=" in caplog.text


@pytest.mark.parametrize("verb", ["submit", "status", "logs"])
def test_job_verbs_have_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hyrank {verb}") and "Examples:\n  hyrank " + verb in out


def test_hyrank_help_does_not_load_torchx():
    """The job verbs import torchx only when they run: `hyrank --help` stays fast."""
    code = ("import sys; from hyrank.pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('torchx', 'kubernetes'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_components_document_every_argument():
    """torchx prints a component's docstring as its --help: every argument has its own line there."""
    import hyrank.jobs.components as components
    from torchx.specs.file_linter import get_fn_docstring, validate

    for name in ("train", "stream", "export"):
        fn = getattr(components, name)
        assert validate(str(ROOT / "jobs" / "components.py"), name) == []  # torchx's own linter
        _, described = get_fn_docstring(fn)
        missing = [arg for arg, text in described.items() if not text.strip()]
        assert not missing, f"{name}: undocumented {missing}"


def test_export_runs_the_export_verb_alone():
    """Dryrun only: one node, one process, `hyrank export` with its arguments."""
    with torchx_runner() as runner:
        info = job_request(runner, "export", ["--checkpoint", "runs/a/checkpoints/step-000000100", "--out",
                                              "exports/a", "--tables", "int8"], "kubernetes")
    (role,) = info._app.roles
    assert (role.name, role.num_replicas, role.min_replicas) == ("export", 1, 1)
    tokens = shlex.split(role.args[1])
    assert tokens[tokens.index("--nnodes") + 1] == "1" and tokens[tokens.index("--nproc_per_node") + 1] == "1"
    assert role.image == "hyrank:0.1.0" and [m.dst_path for m in role.mounts] == ["/app/runs"]
    assert tokens[tokens.index("-m"):] == ["-m", "hyrank.pipeline.cli", "export", "--checkpoint",
                                           "runs/a/checkpoints/step-000000100", "--out", "exports/a",
                                           "--tables", "int8"]


# -- daily scheduling and the image -------------------------------------------------------------------------------


def _torchxconfig() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(TORCHXCONFIG)
    return parser


@pytest.mark.filterwarnings(VOLCANO_NOTE)
def test_cronjob_submits_stream_once_a_day_with_the_jobs_image(capsys):
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "jobs" / "k8s" / "cronjob.yaml").read_text())}
    cron = docs["CronJob"]
    minute, hour, *every = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and every == ["*", "*", "*"], "once a day"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == _torchxconfig()["component:jobs/components.py:stream"]["image"]
    command = container["command"]
    assert command[:4] == ["hyrank", "submit", "--scheduler", "kubernetes"] and "jobs/components.py:stream" in command
    # the submitting pod can reach the API: its service account may create Volcano jobs, its kube config is mounted
    namespace = _torchxconfig()["kubernetes"]["namespace"]
    assert {d["metadata"].get("namespace", namespace) for d in docs.values() if d["kind"] != "Namespace"} == {
        namespace} and cron["metadata"]["namespace"] == namespace
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"] == \
        docs["RoleBinding"]["subjects"][0]["name"]
    (volcano,) = [r for r in docs["Role"]["rules"] if r["apiGroups"] == ["batch.volcano.sh"]]
    assert "create" in volcano["verbs"] and "jobs" in volcano["resources"]
    kubeconfig = {e["name"]: e["value"] for e in container["env"]}["KUBECONFIG"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert kubeconfig == f"{mount['mountPath']}/kubeconfig" and volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert yaml.safe_load(docs["ConfigMap"]["data"]["kubeconfig"])["current-context"] == "in-cluster"
    # and the command is a valid submission: as a dryrun it builds the Volcano job of `hyrank stream`
    assert main([command[1], "--dryrun", *command[2:]]) == 0
    task = yaml.safe_load(capsys.readouterr().out)["spec"]["tasks"][0]
    tokens = shlex.split(task["template"]["spec"]["containers"][0]["command"][2])
    assert tokens[tokens.index("-m"):tokens.index("-m") + 3] == ["-m", "hyrank.pipeline.cli", "stream"]
    # its pods have GPUs, so they run the CUDA image, not the submitting pod's
    assert task["template"]["spec"]["containers"][0]["image"] == \
        _torchxconfig()["component:jobs/components.py:stream"]["cuda_image"]


def test_slurm_crontab_line_submits_stream_once_a_day(capsys):
    (line,) = [ln for ln in (ROOT / "jobs" / "slurm" / "crontab").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    minute, hour, *every_and_command = line.split(maxsplit=5)
    assert minute.isdigit() and hour.isdigit() and every_and_command[:3] == ["*", "*", "*"]
    words = shlex.split(every_and_command[3])
    start = next(i for i, w in enumerate(words) if w.endswith("bin/hyrank"))
    end = words.index(">>") if ">>" in words else len(words)
    argv = words[start + 1:end]
    assert argv[:3] == ["submit", "--scheduler", "slurm"] and "stream" in argv
    assert main([argv[0], "--dryrun", *argv[1:]]) == 0
    assert "-m hyrank.pipeline.cli stream" in capsys.readouterr().out


def _bootstrap_pins() -> dict[str, str]:
    """What scripts/bootstrap.sh installs besides requirements/base.txt: the fbgemm wheels and torchrec."""
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pins = dict(re.findall(r'fbgemm="([\w-]+)==([\w.]+)"', text))
    pins.update(re.findall(r"--no-deps (torchrec)==([\w.]+)", text))
    assert set(pins) == {"fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec"}, pins
    return pins


def test_dockerfile_installs_exactly_the_projects_pins():
    text = (ROOT / "Dockerfile").read_text()
    runs = [" ".join(r.split()) for r in re.findall(r"^RUN (.*?)(?<!\\)$", text.replace("\\\n", " "), re.MULTILINE)]
    installs = [r for r in runs if "pip install" in r]
    pins = _bootstrap_pins()
    base = dict(re.findall(r"^([\w.-]+)==([\w.]+)", (ROOT / "requirements" / "base.txt").read_text(), re.MULTILINE))
    # requirements/base.txt itself, as copied
    assert "COPY requirements/base.txt requirements/base.txt" in text
    assert any("pip install -r requirements/base.txt" in r for r in installs)
    # every other pin is the bootstrap's (or base.txt's, for anything else)
    pinned = re.findall(r'"?([$\w{}.-]+)==([\w.]+)"?', " ".join(installs))
    assert pinned, installs
    arg_default = re.search(r"^ARG FBGEMM=([\w-]+)$", text, re.MULTILINE)[1]
    for name, version in pinned:
        name = arg_default if name in ("$FBGEMM", "${FBGEMM}") else name
        assert version == {**base, **pins}[name], f"Dockerfile pins {name}=={version}"
    assert arg_default == "fbgemm-gpu-cpu"  # the CPU image by default, as bootstrap.sh on a machine without a GPU
    allowed = re.search(r'case "\$FBGEMM" in ([\w|-]+)\)', text)[1].split("|")
    assert sorted(allowed) == ["fbgemm-gpu", "fbgemm-gpu-cpu"] == sorted(p for p in pins if p.startswith("fbgemm"))
    assert re.search(r"--build-arg FBGEMM=fbgemm-gpu ", text), "the CUDA variant is documented"
    assert any("pip install --no-deps torchrec==" in r for r in installs)  # never the CUDA wheel torchrec declares
    assert any(re.search(r"pip install --no-deps (--no-build-isolation )?-e \. ", r + " ") for r in installs)
    # every package pyproject ships is copied into the image
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in folders:
        assert f"COPY {folder} {folder}" in text, f"{folder}/ is not in the image"
