"""Multi-process tests, launched as users launch: `accelerate launch --multi_gpu --num_processes 2 -m trainer`.

On a machine without CUDA the processes form a gloo group (MULTI_CPU; trainer/parallel.py passes cpu=True).
Each launch gets its own rendezvous port, one OpenMP thread per process, and a short process-group timeout,
so a rank that waits in a collective nobody else joins fails the test quickly instead of hanging it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def dist_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLASHDMD_CACHE", str(tmp_path_factory.mktemp("flashdmd-cache")))
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", FLASHDMD_DIST_TIMEOUT_S="90")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def accelerate_cmd(nproc: int) -> list[str]:
    """`accelerate launch` for nproc CPU processes, as users launch (a script or `-m module` follows)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


@pytest.fixture(scope="session")
def launch(dist_env):
    """launch(nproc, *trainer_args, env=..., timeout=...) -> CompletedProcess."""

    def run(nproc: int, *args: str, env: dict[str, str] | None = None, timeout: float = 240):
        cmd = [sys.executable, "-m", "trainer"] if nproc == 1 else [*accelerate_cmd(nproc), "-m", "trainer"]
        return subprocess.run([*cmd, *args], cwd=REPO, env={**dist_env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def single_b4(launch, tmp_path_factory):
    """The reference: one process, batch 4, 3 steps (shared by the DDP, grad_accum and FSDP tests)."""
    from distkit import STEPS, TINY

    run_dir = tmp_path_factory.mktemp("single-b4")
    res = launch(1, *TINY, *STEPS, "--set", "train.batch_size=4", "--run-dir", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir
