"""Starting and stopping the trainer process tree (worker side).

The trainer runs in its own session (so its process group can be signalled as a
whole) with FLASHDMD_JOB_ID in its environment. torch's elastic launcher puts each
rank in a session of its own, so the group alone does not reach every rank: the
final sweep finds the job's processes by that environment variable instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

JOB_ENV = "FLASHDMD_JOB_ID"
PR_SET_PDEATHSIG = 1
# The SIGTERM window under `accelerate launch` (torch's elastic agent): on SIGTERM the launcher forwards it to
# every rank, waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default: 30), then SIGKILLs them. A rank
# that gets SIGTERM finishes its step, joins the stop checkpoint and exits (trainer/loop.py): for SDXL that is
# the rest of a step plus ~10 GB of weights and the optimiser states (sharded under FSDP), which 30 s does
# not cover. The service raises the window to FLASHDMD_LAUNCHER_SHUTDOWN_S (default 540 s); the host stop
# timeouts in deploy/ (docker stop_grace_period, Kubernetes terminationGracePeriodSeconds: 600 s) leave a
# minute beyond it for the launcher to end the ranks.
# The runner's own cancel escalation (SIGTERM after cancel_grace_seconds, SIGKILL after twice that) is
# separate: a cancelled job needs no resumable checkpoint.
LAUNCHER_SHUTDOWN_ENV = "FLASHDMD_LAUNCHER_SHUTDOWN_S"
DEFAULT_LAUNCHER_SHUTDOWN_S = 540


def launcher_env() -> dict[str, str]:
    """The environment a multi-process launch needs beyond the worker's own: the SIGTERM window."""
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(os.environ.get(LAUNCHER_SHUTDOWN_ENV,
                                                                      DEFAULT_LAUNCHER_SHUTDOWN_S)))}


def trainer_command(
    *, spec_path: Path, run_dir: Path, resume: bool, num_processes: int, accelerate_config: Path | None = None
) -> list[str]:
    tail = [str(spec_path), "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    if num_processes <= 1:
        return [sys.executable, "-m", "flashjob", *tail]
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate)] if accelerate.exists() else ["accelerate"]
    # Without a config file, --multi_gpu makes accelerate start N processes on a CPU-only host too (gloo);
    # with only --num_processes it would start one. GPU hosts take NCCL under the same flag.
    config = ["--config_file", str(accelerate_config)] if accelerate_config else ["--multi_gpu"]
    return [*launcher, "launch", *config, "--num_processes", str(num_processes), "-m", "flashjob", *tail]


def die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that has the kernel SIGKILL the child when its parent dies (Linux only).

    Without it a SIGKILLed worker would leave the trainer running, and the next
    attempt would share the run directory with it. libc is loaded here, before the
    fork, so the child only makes the one system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return hook


def spawn(cmd: list[str], *, cwd: Path, log_path: Path, job_id: str, attempt: int,
          extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLASHDMD_ATTEMPT=str(attempt), **launcher_env(),
               **(extra_env or {}))
    env[JOB_ENV] = job_id
    with log_path.open("ab") as out:
        out.write(f"\n==> attempt {attempt}: {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def job_processes(job_id: str) -> list[int]:
    """Pids of this host's processes started for the job (any attempt), found by their environment."""
    marker = f"{JOB_ENV}={job_id}".encode()
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_job_processes(job_id: str) -> int:
    """SIGKILL every process of the job on this host; returns how many were signalled."""
    killed = 0
    for pid in job_processes(job_id):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            continue
    if killed:
        log.warning("job %s: killed %d leftover trainer process(es)", job_id, killed)
    return killed


def drain_marker(worker_pid: int) -> Path:
    """A file the worker's main process creates when it is asked to shut down (warm shutdown).

    Celery's warm shutdown only waits for the running task, and the trainer runs in a
    session of its own, so no signal reaches it: the task polls this file instead.
    Host-local and keyed by the main process id, which the task knows as its parent.
    """
    return Path(tempfile.gettempdir()) / f"flashdmd-drain-{socket.gethostname()}-{worker_pid}"


def output_tail(log_path: Path, max_bytes: int = 4000, max_lines: int = 20) -> str:
    """The end of the trainer's output, for a failed job's error message."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-max_lines:])
