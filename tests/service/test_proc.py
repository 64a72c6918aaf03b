"""The worker's process handling: the trainer command, its own process group, and no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from servicekit import wait_for

from api.proc import job_processes, kill_job_processes, output_tail, spawn, trainer_command

pytestmark = pytest.mark.service
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_trainer_command() -> None:
    spec, run = Path("/runs/j/spec.json"), Path("/runs/j")
    assert trainer_command(spec_path=spec, run_dir=run, resume=True, num_processes=1) == [
        sys.executable, "-m", "flashjob", str(spec), "--run-dir", str(run), "--resume"]
    many = trainer_command(spec_path=spec, run_dir=run, resume=False, num_processes=4,
                           accelerate_config=Path("/cfg/ddp.yaml"))
    assert Path(many[0]).name == "accelerate" and many[1:] == [
        "launch", "--config_file", "/cfg/ddp.yaml", "--num_processes", "4", "-m", "flashjob", str(spec),
        "--run-dir", str(run)]
    # Without a config file, --multi_gpu: plain --num_processes N starts one process on a CPU-only host.
    bare = trainer_command(spec_path=spec, run_dir=run, resume=False, num_processes=2)
    assert bare[1:5] == ["launch", "--multi_gpu", "--num_processes", "2"] and bare[5:7] == ["-m", "flashjob"]


def test_spawned_trainer_has_its_own_group_and_is_found_by_job(tmp_path) -> None:
    proc = spawn(SLEEPER, cwd=tmp_path, log_path=tmp_path / "trainer.log", job_id="job_proc1", attempt=1)
    try:
        assert os.getpgid(proc.pid) == proc.pid  # its own group: the worker signals all of it at once
        assert job_processes("job_proc1") == [proc.pid]
        assert kill_job_processes("job_proc1") == 1
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
    assert "==> attempt 1:" in (tmp_path / "trainer.log").read_text()


def test_the_trainer_dies_with_its_worker(tmp_path) -> None:
    # A stand-in worker process starts a trainer through api.proc.spawn, then is SIGKILLed.
    code = (
        "import sys, time; from pathlib import Path; from api.proc import spawn; "
        f"p = spawn({SLEEPER!r}, cwd=Path({str(tmp_path)!r}), log_path=Path({str(tmp_path)!r}) / 'log', "
        "job_id='job_proc2', attempt=1); print(p.pid, flush=True); time.sleep(120)"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        trainer_pid = int(worker.stdout.readline())  # type: ignore[union-attr]
        assert job_processes("job_proc2") == [trainer_pid]
        worker.kill()
        worker.wait()
        wait_for(lambda: not job_processes("job_proc2"), 10, what="the orphaned trainer to be killed")
    finally:
        worker.kill()
        kill_job_processes("job_proc2")


def test_output_tail(tmp_path) -> None:
    log = tmp_path / "trainer.log"
    log.write_text("\n".join(f"line {i}" for i in range(100)) + "\nerror: invalid spec\n\n")
    tail = output_tail(log, max_lines=3)
    assert tail == "line 98\nline 99\nerror: invalid spec"
    assert output_tail(tmp_path / "missing.log") == ""
