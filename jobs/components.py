"""torchx components of hyrank: `train`, `stream` and `export` as jobs for any torchx scheduler.

    hyrank submit --scheduler local_cwd train -j 2x1 --days 2026-11-01..2026-11-03          # this machine
    hyrank submit --scheduler kubernetes --dryrun stream -j 2x8 --gpu 8 -- --set=train.lr=0.001
    torchx run -s slurm jobs/components.py:train -j 4x8 --days 2026-11-01..2026-11-30      # torchx's own CLI
    torchx run jobs/components.py:train --help                                              # these docstrings

Each component is torchx's `dist.ddp` (one role of N nodes x M processes under torchrun, c10d rendezvous on
the first node) running `python -m hyrank.pipeline.cli <verb> ... --quiet`, so the same command runs on a laptop
(`local_cwd`), Kubernetes (a Volcano job) and Slurm (an sbatch script); only the scheduler changes. Defaults per
scheduler and per component (image, mounts) live in `.torchxconfig` at the repository root.

Every host reads the run's files: the data root and `checkpoint.dir` (default `<out_dir>/checkpoints`) must be on
storage all nodes share, because rank 0 writes checkpoints that every rank loads on a restart: a ReadWriteMany
volume, NFS, Lustre (`mounts`), or object storage, with no volume at all: `data_root` and `checkpoint_dir`
`s3://bucket/prefix` (S3, MinIO, Ceph, OSS, R2), the credentials from a Kubernetes Secret (`storage_secret`: its
keys, e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL for an S3-compatible store, become every
pod's environment) or the pod's role (the scheduler's `service_account`). A job whose data and checkpoints are on
object storage mounts nothing (the `mounts` of .torchxconfig are dropped): its out_dir (logs, metrics) is the
pod's own disk, and the run lock and the row ledger lie beside the checkpoints.

torchx loads this file by executing it in its own module namespace (torchx.specs.finder), not by importing it:
it imports nothing of hyrank, defines no name that module already has (e.g. `logger`, `validate`), and its
component signatures use typing's Optional/Dict/List (torchx's linter reads them from the source).
"""

import inspect
import textwrap
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

_CONFIG = "jobs/configs/default.toml"  # relative to the job's working directory: the checkout, or the image's /app
_IMAGE = "hyrank:0.1.0"  # `docker build -t hyrank:0.1.0 .`; push it and name the pushed image in .torchxconfig
# `docker build --build-arg FBGEMM=fbgemm-gpu -t hyrank:0.1.0-cuda .`: the image of a job with GPUs. The CPU image's
# fbgemm-gpu-cpu has no CUDA kernels, so its ranks would fail at their first sharded lookup on a GPU node
_CUDA_IMAGE = "hyrank:0.1.0-cuda"
# Every rank of a job with GPUs: a collective that fails or times out on one rank ends that process (torchelastic
# then restarts the job's ranks from the latest checkpoint) instead of leaving the others blocked in it; NCCL's
# own reason for a failure reaches the rank's log. The fabric's settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...)
# are the cluster's: pass them with --env, which wins over these.
_NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "NCCL_DEBUG": "WARN"}
_VERBS_WITH_OWN_LAUNCHER = ("--nproc-per-node",)  # -j decides the processes per node

# The arguments every component takes, documented once: `_with_job_args` appends this to each docstring's Args
# (torchx prints a component's docstring as its --help).
_JOB_ARGS_DOC = """
    j: {nnodes}x{nproc_per_node}, e.g. 2x8: nodes, and processes (ranks) on each. [{min}:]{max}x{nproc} is elastic
    image: container image holding hyrank (kubernetes, docker); local_cwd and slurm run this checkout instead
    cuda_image: the image of a job with GPUs (built with --build-arg FBGEMM=fbgemm-gpu), used instead of image
    cpu: CPUs per node
    gpu: GPUs per node (nproc_per_node must not exceed it)
    memMB: memory per node in MB
    h: a torchx named resource (e.g. gpu.large); if set, it takes precedence over cpu, gpu and memMB
    env: environment variables of every rank, e.g. NCCL_DEBUG=INFO,LOGLEVEL=INFO
    mounts: volumes for the data root and checkpoint.dir, shared by all nodes, e.g.
        type=volume,src=hyrank-runs,dst=/app/runs (a PVC) or type=bind,src=/mnt/nfs/data,dst=/app/data; none
        when data_root and checkpoint_dir are on object storage
    data_root: the logs (data.root), e.g. s3://logs/clicks ("" for the config's)
    checkpoint_dir: the run's checkpoints (checkpoint.dir), e.g. s3://models/prod/checkpoints ("" for the config's)
    storage_secret: a Kubernetes Secret whose keys become every pod's environment (the object store's
        credentials and endpoint: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL); "" for none
    max_retries: restarts after a failure. torchelastic restarts every rank up to this many times
        (--max-restarts: train continues from its latest checkpoint, stream always does), and the scheduler
        resubmits a job that lost a node up to this many times (Volcano maxRetry, Slurm requeue)
    rdzv_port: port of the c10d rendezvous store on the first node (multi-node jobs; one node picks a free port)
    rdzv_backend: torchelastic rendezvous: c10d (a store on the first node) or static (fixed node ranks)
"""


def _with_job_args(fn):
    """Append the shared job arguments to `fn`'s Args section (its docstring ends with that section)."""
    fn.__doc__ = inspect.cleandoc(fn.__doc__) + "\n" + textwrap.indent(inspect.cleandoc(_JOB_ARGS_DOC), "    ")
    return fn


_OBJECT_STORAGE = ("s3://",)
SECRET_METADATA = "hyrank/storage_secret"  # role metadata: `hyrank submit` adds the Secret to the pods (envFrom)


def _storage_args(data_root: str, checkpoint_dir: str) -> List[str]:
    """The verb's --set of the storage locations given as component arguments."""
    return ([f'--set=data.root="{data_root}"'] if data_root else []) + \
        ([f'--set=checkpoint.dir="{checkpoint_dir}"'] if checkpoint_dir else [])


def _hyrank_job(verb: str, verb_args: List[str], extra: List[str], *, j: str, image: str, cuda_image: str, cpu: int,
                gpu: int, memMB: int, h: Optional[str], env: Optional[Dict[str, str]], mounts: Optional[List[str]],
                max_retries: int, rdzv_port: int, rdzv_backend: str, storage: List[str] = (),
                storage_secret: str = "") -> specs.AppDef:
    """dist.ddp running `python -m hyrank.pipeline.cli <verb> <verb_args> <extra>` under torchrun, with torchelastic
    restarts; its one role is named after the verb. A role with GPUs (from --gpu or a named resource -h) runs
    `cuda_image` with the NCCL environment; on Kubernetes torchx gives every pod a memory-backed /dev/shm without a
    size limit (NCCL's shared-memory transport needs more than a container's default 64 MB; it counts against
    memMB)."""
    for flag in _VERBS_WITH_OWN_LAUNCHER:
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ValueError(f"{flag} is not a job argument: -j NNODESxNPROC sets the ranks of a job")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    # torch 2.13's rendezvous keeps one TCPStore across rounds, but a worker's keys are not prefixed by attempt
    # (torch.distributed.rendezvous._create_c10d_store expects a new store per retry): after a torchelastic
    # restart a rank can read a dead rank's Gloo address ("connectFullMesh failed ... Connection refused",
    # measured). Opting out of the sharing gives every round its own store.
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    if storage and all(loc.startswith(_OBJECT_STORAGE) for loc in storage):
        mounts = None  # data and checkpoints (and exports) on object storage: no volume for pods to share
    app = ddp(verb, *verb_args, *extra, m="hyrank.pipeline.cli", name=f"hyrank/hyrank-{verb}", image=image, cpu=cpu,
              gpu=gpu, memMB=memMB, h=h, j=j, env=env, max_retries=max_retries, rdzv_port=rdzv_port,
              rdzv_backend=rdzv_backend, mounts=mounts)
    role = app.roles[0]
    if role.resource.gpu > 0:
        role.image = cuda_image
        role.env = {**_NCCL_ENV, **role.env}  # role.env holds --env: the cluster's values win
    shell_flag, command = role.args
    if not command.startswith("torchrun "):
        raise ValueError(f"dist.ddp's command changed (expected `torchrun ...`): {command[:80]}")
    # ddp's max_retries is only the scheduler's; torchelastic's own restarts are what a crashed rank needs (a fresh
    # attempt inside the same allocation, TORCHELASTIC_RESTART_COUNT > 0, so train resumes from latest)
    role.args = [shell_flag, f"torchrun --max-restarts {max_retries} " + command[len("torchrun "):]]
    role.name = verb
    if storage_secret:
        role.metadata[SECRET_METADATA] = storage_secret
    return app


@_with_job_args
def train(*extra: str, days: str, config: str = _CONFIG, eval_day: str = "", resume: str = "latest-if-any",
          j: str = "1x2", image: str = _IMAGE, cuda_image: str = _CUDA_IMAGE, cpu: int = 4, gpu: int = 0,
          memMB: int = 16384, h: Optional[str] = None, env: Optional[Dict[str, str]] = None,
          mounts: Optional[List[str]] = None, max_retries: int = 0, rdzv_port: int = 29500,
          rdzv_backend: str = "c10d", data_root: str = "", checkpoint_dir: str = "",
          storage_secret: str = "") -> specs.AppDef:
    """Train on a range of days (`hyrank train`), on j nodes x processes.

    Runs `python -m hyrank.pipeline.cli train --config CONFIG --days DAYS ... --quiet` on every rank. Every attempt of
    the job (a torchelastic restart, a scheduler retry, a resubmission) continues from the run's latest
    checkpoint unless --resume says otherwise, so a job is safe to retry and finished days are not redone.

    Args:
        extra: further `hyrank train` arguments after `--`, e.g. -- --set train.lr=0.01 --set out_dir="runs/a"
        days: training days, YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD
        config: run config (TOML), relative to the job's working directory
        eval_day: evaluation day YYYY-MM-DD after training ("" for none)
        resume: latest-if-any (continue from the newest checkpoint if there is one), latest (require one), a
            step-N folder, or "" to start fresh whatever checkpoint.dir holds
    """
    verb_args = ["--config", config, "--days", days, "--quiet"]
    verb_args += ["--eval-day", eval_day] if eval_day else []
    verb_args += ["--resume", resume] if resume else []
    verb_args += _storage_args(data_root, checkpoint_dir)
    return _hyrank_job("train", verb_args, list(extra), j=j, image=image, cuda_image=cuda_image, cpu=cpu, gpu=gpu,
                       memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries, rdzv_port=rdzv_port,
                       rdzv_backend=rdzv_backend, storage=[data_root, checkpoint_dir], storage_secret=storage_secret)


@_with_job_args
def stream(*extra: str, config: str = _CONFIG, from_day: str = "", until: str = "", follow: bool = False,
           skip_gaps: bool = False, warm_start: str = "", j: str = "1x2", image: str = _IMAGE,
           cuda_image: str = _CUDA_IMAGE, cpu: int = 4, gpu: int = 0, memMB: int = 16384, h: Optional[str] = None,
           env: Optional[Dict[str, str]] = None, mounts: Optional[List[str]] = None, max_retries: int = 0,
           rdzv_port: int = 29500, rdzv_backend: str = "c10d", data_root: str = "", checkpoint_dir: str = "",
           export_to: str = "", storage_secret: str = "") -> specs.AppDef:
    """Daily retraining (`hyrank stream`): evaluate each complete day with the current model, then train on it.

    Runs `python -m hyrank.pipeline.cli stream --config CONFIG ... --quiet` on every rank. It always warm-starts from the
    run's latest checkpoint, so a restarted or resubmitted job continues exactly; submitted once a day (the
    CronJob in jobs/k8s/cronjob.yaml, the crontab line in jobs/slurm/crontab) it takes the days that completed
    since, then exits.

    Args:
        extra: further `hyrank stream` arguments after `--`, e.g. -- --set out_dir="runs/prod" --poll-s 30
        config: run config (TOML), relative to the job's working directory
        from_day: first day of a fresh run, YYYY-MM-DD (`--from`; "" for the earliest complete day)
        until: last day to train, YYYY-MM-DD ("" for none)
        follow: keep waiting for days that are not complete yet (a job that does not end)
        skip_gaps: skip a missing day once a later day is complete (logged in history.jsonl)
        warm_start: the latest checkpoint is of another model: carry dense, tables or matching weights ("" to refuse)
        export_to: publish each day's model to this root (`--export-to`), e.g. s3://models/prod/serving
    """
    verb_args = ["--config", config, "--quiet"]
    verb_args += ["--from", from_day] if from_day else []
    verb_args += ["--until", until] if until else []
    verb_args += ["--follow"] if follow else []
    verb_args += ["--skip-gaps"] if skip_gaps else []
    verb_args += ["--warm-start", warm_start] if warm_start else []
    verb_args += ["--export-to", export_to] if export_to else []
    verb_args += _storage_args(data_root, checkpoint_dir)
    storage = [data_root, checkpoint_dir] + ([export_to] if export_to else [])
    return _hyrank_job("stream", verb_args, list(extra), j=j, image=image, cuda_image=cuda_image, cpu=cpu, gpu=gpu,
                       memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries, rdzv_port=rdzv_port,
                       rdzv_backend=rdzv_backend, storage=storage, storage_secret=storage_secret)


def export(*extra: str, checkpoint: str, out: str, tables: str = "", image: str = _IMAGE,
           cuda_image: str = _CUDA_IMAGE, cpu: int = 4, gpu: int = 0, memMB: int = 16384, h: Optional[str] = None,
           env: Optional[Dict[str, str]] = None, mounts: Optional[List[str]] = None,
           max_retries: int = 0, storage_secret: str = "") -> specs.AppDef:
    """Export a checkpoint for serving (`hyrank export`): one process on one node.

    Runs `python -m hyrank.pipeline.cli export --checkpoint CHECKPOINT --out OUT [--tables T]` as a 1x1 torchrun job.

    Args:
        extra: further `hyrank export` arguments after `--`
        checkpoint: the step-N checkpoint folder to export (on the shared storage the training job wrote)
        out: the folder to publish the export to
        tables: embedding tables as fp32, fp16 or int8 ("" for the verb's default)
        image: container image holding hyrank (kubernetes, docker); local_cwd and slurm run this checkout instead
        cuda_image: the image of a job with GPUs (built with --build-arg FBGEMM=fbgemm-gpu), used instead of image
        cpu: CPUs
        gpu: GPUs
        memMB: memory in MB
        h: a torchx named resource (e.g. gpu.small); if set, it takes precedence over cpu, gpu and memMB
        env: environment variables, e.g. LOGLEVEL=INFO
        mounts: volumes holding the checkpoint and the output folder, e.g. type=volume,src=hyrank-runs,dst=/app/runs;
            none when both are on object storage (s3://)
        max_retries: restarts after a failure (torchelastic), and resubmissions by the scheduler
        storage_secret: a Kubernetes Secret whose keys become the pod's environment (the object store's credentials
            and endpoint); "" for none
    """
    verb_args = ["--checkpoint", checkpoint, "--out", out]
    verb_args += ["--tables", tables] if tables else []
    return _hyrank_job("export", verb_args, list(extra), j="1x1", image=image, cuda_image=cuda_image, cpu=cpu,
                       gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries, rdzv_port=29500,
                       rdzv_backend="c10d", storage=[checkpoint, out], storage_secret=storage_secret)
