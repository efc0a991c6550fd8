"""`hyrank submit | status | logs`: hyrank's jobs (jobs/components.py) on any torchx scheduler, through torchx's
runner API (no `torchx` subprocess).

    hyrank submit --scheduler local_cwd train -j 2x1 --days 2026-11-01..2026-11-03   # here: waits, streams logs
    hyrank submit --scheduler kubernetes --dryrun stream -j 2x8 --gpu 8               # the Volcano job, as YAML
    hyrank status kubernetes://torchx/hyrank:hyrank-stream-x1b2c
    hyrank logs kubernetes://torchx/hyrank:hyrank-stream-x1b2c

    with torchx_runner() as runner:                         # the same from Python (tests/test_jobs.py)
        handle = runner.schedule(job_request(runner, "train", ["--days", "2026-11-01"], "local_cwd"))
        status = wait_for(runner, handle, timeout_s=600)

Defaults come from `.torchxconfig` in $HOME and the working directory, as for the torchx CLI: a scheduler's
section ([kubernetes] queue, [slurm] partition, ...) under --scheduler-args, a component's section
([component:jobs/components.py:train] image, mounts, ...) under its arguments. torchx is imported only when one of
these verbs runs, so that `hyrank --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

COMPONENTS = ("train", "stream", "export")  # short names of the functions in jobs/components.py
_COMPONENTS_FILE = "jobs/components.py"
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Schedulers that run this checkout with this Python on the hosts that share it: no image, and the job's PATH
# starts with this interpreter's bin/ (its torchrun), whether or not the virtual environment was activated.
_CHECKOUT_SCHEDULERS = ("local_cwd", "slurm", "lsf")


def add_job_verbs(verbs, verb) -> None:
    """Register submit, status and logs; `verb(verbs, name, handler)` is pipeline.cli.verb."""
    p = verb(verbs, "submit", submit_job)
    p.add_argument("--scheduler", required=True, help="torchx scheduler: local_cwd, kubernetes, slurm, ...")
    p.add_argument("--scheduler-args", metavar="KEY=VALUE,...",
                   help="scheduler options over .torchxconfig's (`torchx runopts SCHEDULER` lists them)")
    p.add_argument("--dryrun", action="store_true",
                   help="print the scheduler's request (Volcano job YAML, sbatch script) instead of submitting")
    p.add_argument("--wait", action="store_true", help="wait for a remote job to end; exit 1 unless it succeeded "
                   "(a local job is always waited for, its logs streamed: it lives as long as this command)")
    # one REMAINDER for the component and its arguments: argparse would drop a `--` right after a positional
    p.add_argument("component", nargs=argparse.REMAINDER, metavar="COMPONENT [ARGS]",
                   help=f"{', '.join(COMPONENTS)} ({_COMPONENTS_FILE}) or any torchx component (FILE.py:FUNCTION, "
                   "dist.ddp), then its arguments (COMPONENT --help lists them); after --, the hyrank verb's own")
    p = verb(verbs, "status", job_status)
    p.add_argument("handle", help="an app handle printed by hyrank submit, e.g. kubernetes://torchx/NS:NAME")
    p = verb(verbs, "logs", job_logs)
    p.add_argument("handle", help="an app handle printed by hyrank submit")
    p.add_argument("--role", help="only this role's replicas (default: all)")


def submit_job(args) -> int:
    """Submit a hyrank job (train, stream, export) to a torchx scheduler: this machine, Kubernetes, Slurm.

    The same job runs anywhere; only --scheduler changes. `hyrank submit --scheduler S train --help` lists a
    component's arguments (-j NNODESxNPROC, --cpu/--gpu/--memMB, --image, --env, --mounts, --max_retries,
    --rdzv_port); after `--` come the hyrank verb's own (write --set as --set=KEY=VALUE: torchx's CLI refuses a
    repeated option). Prints the app handle for `hyrank status` and `hyrank logs`. A local_cwd job runs here:
    submit streams its logs, waits for it and exits 1 if it failed.

    Examples:
      hyrank submit --scheduler local_cwd train -j 2x1 --days 2026-11-01..2026-11-03 -- --set=train.lr=0.01
      hyrank submit --scheduler kubernetes --dryrun stream -j 2x8 --gpu 8 > volcano-job.yaml
      hyrank submit --scheduler kubernetes --scheduler-args namespace=ml,queue=prod stream -j 2x8 --gpu 8
      hyrank submit --scheduler slurm --scheduler-args partition=gpu train -j 4x8 --gpu 8 --days 2026-11-01..2026-11-30
      hyrank submit --scheduler local_cwd export --checkpoint runs/default/checkpoints/step-000004688 --out exports/a
    """
    if not args.component:
        raise ValueError(f"name a component to submit: {', '.join(COMPONENTS)}, or FILE.py:FUNCTION")
    component, *component_args = args.component
    with torchx_runner() as runner:
        request = job_request(runner, component, component_args, args.scheduler, args.scheduler_args)
        if args.dryrun:
            print(request)
            return 0
        with _torchx_errors(f"submitting to {args.scheduler}"):
            handle = runner.schedule(request)
        print(handle, flush=True)
        local = args.scheduler.startswith("local")
        if not (local or args.wait):
            print(_status_line(handle, runner.status(handle)))
            return 0
        # a remote job's logs: `hyrank logs HANDLE` (its pods may not exist yet)
        status = wait_for(runner, handle, poll_s=1.0 if local else 30.0, log_to=sys.stderr if local else None)
        print(_status_line(handle, status))
        if status is not None and status.state.name == "SUCCEEDED":
            return 0
        if local:  # after the agents' tracebacks, what the ranks said
            for message in _rank_errors(runner, handle):
                logging.getLogger("hyrank").error("%s: %s", handle, message)
        return 1


def job_status(args) -> int:
    """The state of a job submitted with hyrank submit: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED.

    A local_cwd job ended with the hyrank submit that ran it; its state is read from the log_dir of
    .torchxconfig's [local_cwd] section, where it stays.

    Examples:
      hyrank status kubernetes://torchx/hyrank:hyrank-stream-x1b2c
      hyrank status slurm://torchx/4242
    """
    scheduler = args.handle.partition("://")[0]
    if scheduler.startswith("local"):
        app_dir = _local_app_dir(args.handle)
        done = app_dir / "SUCCESS"  # torchx writes it once the app ended and its logs are closed
        state = json.loads(done.read_text())["final_state"] if done.is_file() else "RUNNING (or its submit died)"
        print(f"{args.handle}: {state}; logs under {app_dir}")
        return 0
    with torchx_runner() as runner, _torchx_errors(args.handle):
        print(_status_line(args.handle, runner.status(args.handle)))
    return 0


def job_logs(args) -> int:
    """Print the logs of every replica of a job (each line prefixed with ROLE/REPLICA).

    A local_cwd job's logs are read from the log_dir of .torchxconfig's [local_cwd] section.

    Examples:
      hyrank logs kubernetes://torchx/hyrank:hyrank-stream-x1b2c
      hyrank logs local_cwd://torchx/hyrank-train-k2m4 --role train
    """
    if args.handle.startswith("local"):
        for log in sorted(_local_app_dir(args.handle).glob("*/*/combined.log")):
            role, replica = log.parent.parent.name, log.parent.name
            if args.role in (None, role):
                for line in log.read_text(errors="replace").splitlines():
                    print(f"{role}/{replica} {line}")
        return 0
    with torchx_runner() as runner, _torchx_errors(args.handle):
        if runner.status(args.handle) is None:
            raise ValueError(f"{args.handle}: no such job on its scheduler (ended long ago, or a typo)")
        for role, replica in _replicas(runner, args.handle, args.role):
            for line in runner.log_lines(args.handle, role, replica):
                print(f"{role}/{replica} {line}", end="" if line.endswith("\n") else "\n")
    return 0


# -- the programmatic API -------------------------------------------------------------------------------------------


def torchx_runner():
    """torchx's Runner (use it as a context manager: closing it ends the local jobs it started)."""
    from torchx.runner import get_runner

    return get_runner()


def job_request(runner, component: str, component_args: list[str], scheduler: str, scheduler_args: str | None = None):
    """The scheduler's request for `component` with its arguments (what --dryrun prints, what submit schedules):
    torchx's AppDryRunInfo. `component` is train/stream/export (jobs/components.py) or any torchx component."""
    from torchx.runner import config
    from torchx.specs.builders import materialize_appdef
    from torchx.specs.finder import get_component

    if scheduler not in runner.scheduler_backends():
        raise ValueError(f"unknown scheduler {scheduler!r}: one of {', '.join(runner.scheduler_backends())}")
    name, defaults_key = _component_name(component)
    with _torchx_errors(f"{scheduler} run options"):
        cfg = runner.scheduler_run_opts(scheduler).cfg_from_str(scheduler_args or "")
        config.apply(scheduler, cfg)
    with _torchx_errors(component):
        fn = get_component(name).fn
        app = materialize_appdef(fn, list(component_args), config.load_sections("component").get(defaults_key))
    for role in app.roles:
        if scheduler in _CHECKOUT_SCHEDULERS:
            role.env.setdefault("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        elif not role.image:
            key = "cuda_image" if role.resource.gpu > 0 else "image"  # jobs/components.py: GPUs run cuda_image
            raise ValueError(f"{component}: {scheduler} runs containers and the job names no image: pass --{key} "
                             f"REGISTRY/hyrank:TAG or set `{key}` in .torchxconfig's [component:{defaults_key}]")
    with _torchx_errors(f"{component} on {scheduler}"):
        request = runner.dryrun(app, scheduler, cfg=cfg, workspace=None)
    _add_storage_secret(app, scheduler, request)
    return request


STORAGE_SECRET = "hyrank/storage_secret"  # the role metadata jobs/components.py sets from `storage_secret`


def _add_storage_secret(app, scheduler: str, request) -> None:
    """The Kubernetes Secret a component names (`storage_secret`: the object store's credentials) becomes the
    environment of every pod (envFrom): torchx's pods take plain values only, and a secret's belong in no job spec."""
    secrets = {role.metadata[STORAGE_SECRET] for role in app.roles if role.metadata.get(STORAGE_SECRET)}
    if not secrets:
        return
    if scheduler != "kubernetes":
        raise ValueError(f"storage_secret names a Kubernetes Secret; on {scheduler} the ranks take the object store's "
                         "credentials from the hosts' AWS chain (environment via --env, ~/.aws, instance role)")
    from kubernetes.client import V1EnvFromSource, V1SecretEnvSource

    (secret,) = secrets  # hyrank's components have one role
    for task in request.request.resource["spec"]["tasks"]:
        for container in task["template"].spec.containers:
            container.env_from = [*(container.env_from or []), V1EnvFromSource(secret_ref=V1SecretEnvSource(
                name=secret))]


def wait_for(runner, handle: str, *, timeout_s: float | None = None, poll_s: float = 1.0, log_to=None):
    """Poll until the job ends (its final AppStatus) or `timeout_s` passes (its status then); `log_to`: a file
    that every replica's log lines are streamed to meanwhile, prefixed ROLE/REPLICA."""
    threads = [threading.Thread(target=_stream_log, args=(runner, handle, role, replica, log_to), daemon=True)
               for role, replica in (_replicas(runner, handle, None) if log_to is not None else [])]
    for t in threads:
        t.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = runner.status(handle)
        if status is None or status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(poll_s)
    for t in threads:
        t.join(timeout=5.0)  # the last lines, once the replicas' log files are closed
    return status


# -- helpers --------------------------------------------------------------------------------------------------------


def _component_name(component: str) -> tuple[str, str]:
    """(what torchx loads, the key of its .torchxconfig section). A short name is a function of this checkout's
    jobs/components.py, named as the torchx CLI names it when run from the repository root."""
    if component not in COMPONENTS:
        return component, component
    key = f"{_COMPONENTS_FILE}:{component}"
    here = Path(_COMPONENTS_FILE).is_file()
    return (key if here else f"{_PROJECT_ROOT / _COMPONENTS_FILE}:{component}"), key


@contextlib.contextmanager
def _torchx_errors(what: str):
    """torchx's user errors (unknown component, bad argument, missing run option, unknown resource or app) as one
    ValueError line naming `what`: pipeline.cli.main prints it without a traceback."""
    from torchx.specs.api import InvalidRunConfigException, MalformedAppHandleException, UnknownAppException
    from torchx.specs.finder import ComponentNotFoundException, ComponentValidationException

    try:
        yield
    except FileNotFoundError as e:  # a component file, or the scheduler's client (sbatch) not installed here
        raise FileNotFoundError(f"{what}: {_one_line(e)}") from e
    except InvalidRunConfigException as e:
        raise ValueError(f"{what}: {_one_line(e)} (--scheduler-args {e.cfg_key}=..., or `{e.cfg_key} = ...` in "
                         ".torchxconfig)") from e
    except (ComponentNotFoundException, ComponentValidationException, MalformedAppHandleException,
            UnknownAppException, KeyError, ValueError) as e:
        raise ValueError(f"{what}: {_one_line(e)}") from e
    except Exception as e:
        if type(e).__module__.startswith("urllib3."):  # no cluster answering (e.g. no kube config: torchx warned)
            raise ValueError(f"{what}: the scheduler's API did not answer (kube config: KUBECONFIG or "
                             f"~/.kube/config): {_one_line(e)}") from e
        if type(e).__module__.startswith("kubernetes."):  # the API refused: the client's own message
            raise ValueError(f"{what}: kubernetes: {_one_line(e)}") from e
        raise


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def _status_line(handle: str, status) -> str:
    if status is None:
        return f"{handle}: unknown (no such job on its scheduler)"
    line = f"{handle}: {status.state.name}"
    line += f", {status.num_restarts} restarts" if status.num_restarts else ""
    line += f" ({status.msg})" if status.msg and status.msg != "<NONE>" else ""  # torchx's "no message"
    return line + (f"; {status.ui_url}" if status.ui_url else "")


def _replicas(runner, handle: str, role_name: str | None) -> list[tuple[str, int]]:
    app = runner.describe(handle)
    if app is None:
        raise ValueError(f"{handle}: no such job on its scheduler")
    return [(r.name, k) for r in app.roles if role_name in (None, r.name) for k in range(r.num_replicas)]


# a rank's line as torchrun tees it ("[LOCAL_RANK]:"): hyrank's logged errors, and the last line of a traceback
_RANK_ERROR = re.compile(r"^\[\d+\]:(?:.*\[rank \d+\] ERROR [\w.]+: (?P<logged>.*)"
                         r"|(?P<raised>[\w.]*(?:Error|Exception): .*))$")


def _rank_errors(runner, handle: str, most: int = 5) -> list[str]:
    """The errors the ranks of a job logged or raised, each once (the same error on every rank is one)."""
    found: dict[str, None] = {}
    for role, replica in _replicas(runner, handle, None):
        with contextlib.suppress(Exception):  # a replica without a log says nothing
            for line in runner.log_lines(handle, role, replica):
                m = _RANK_ERROR.match(line.rstrip("\n"))
                if m:
                    found.setdefault(m["logged"] or m["raised"])
    return list(found)[:most]


def _stream_log(runner, handle: str, role: str, replica: int, out) -> None:
    try:
        for line in runner.log_lines(handle, role, replica, should_tail=True):
            print(f"{role}/{replica} {line}", end="" if line.endswith("\n") else "\n", file=out, flush=True)
    except Exception as e:  # a replica that never wrote a log: the final status says what happened
        print(f"{role}/{replica}: no log ({_one_line(e)})", file=out, flush=True)


def _local_app_dir(handle: str) -> Path:
    """Where a local_cwd job's logs stayed: <log_dir>/<session>/<app_id>, log_dir from .torchxconfig."""
    from torchx.runner import config
    from torchx.specs.api import parse_app_handle

    with _torchx_errors(handle):
        scheduler, session, app_id = parse_app_handle(handle)
    cfg: dict = {}
    config.apply(scheduler, cfg)
    if not cfg.get("log_dir"):
        raise ValueError(f"{handle}: a {scheduler} job's logs are kept only with a log_dir; set `log_dir` in the "
                         f"[{scheduler}] section of .torchxconfig")
    app_dir = Path(str(cfg["log_dir"])) / session / app_id
    if not app_dir.is_dir():
        raise FileNotFoundError(f"{handle}: no job folder {app_dir} (another log_dir, or another machine)")
    return app_dir
