"""What the worker reports with each job heartbeat: its device, the memory in use and the utilisation.

The dashboard's system panel shows it (JobPublic.system). Everything here must be cheap and must never
fail the heartbeat it rides on: a missing library or an NVML error leaves a field out instead.

- CPU workers: the trainer's process tree (psutil): resident memory and CPU use as a share of the
  machine's cores, measured between two heartbeats, plus the machine's RAM.
- GPU workers: per visible GPU, memory used and utilisation from NVML through torch.cuda's helpers,
  which never create a CUDA context in this process (the trainer owns the GPUs).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CpuClock:
    """The previous reading of the tree's CPU seconds, so each sample is the use since the last one."""

    cpu_seconds: float | None = None
    at: float = field(default_factory=time.monotonic)


def _tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def process_usage(pid: int, clock: CpuClock) -> dict[str, Any]:
    """Resident bytes of `pid` and its children, and their CPU use since the last call (0-100 % of all cores)."""
    import psutil

    rss, cpu = 0, 0.0
    for proc in _tree(pid):
        try:
            rss += proc.memory_info().rss
            times = proc.cpu_times()
            cpu += times.user + times.system
        except psutil.Error:  # a child exited between listing and reading: it no longer uses anything
            continue
    now = time.monotonic()
    out: dict[str, Any] = {"rss_bytes": rss}
    if clock.cpu_seconds is not None and now > clock.at:
        cores = psutil.cpu_count() or 1
        # Children that exited take their CPU seconds with them: clamp the occasional negative delta.
        out["cpu_percent"] = round(max(0.0, cpu - clock.cpu_seconds) / (now - clock.at) / cores * 100, 1)
    clock.cpu_seconds, clock.at = cpu, now
    return out


def gpu_usage(count: int) -> list[dict[str, Any]]:
    """One entry per visible GPU (index as the trainer sees it); [] without NVML."""
    try:
        import torch
    except ImportError:
        return []
    devices = []
    for index in range(count):
        entry: dict[str, Any] = {"index": index}
        try:
            entry["memory_used_bytes"] = int(torch.cuda.device_memory_used(index))
            entry["utilization_percent"] = int(torch.cuda.utilization(index))
            # torch's NVML handle honours CUDA_VISIBLE_DEVICES like the two calls above (private, hence guarded).
            handle = torch.cuda._get_pynvml_handler(index)
            info = torch.cuda.pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = torch.cuda.pynvml.nvmlDeviceGetName(handle)
            entry.update(memory_total_bytes=int(info.total), name=name.decode() if isinstance(name, bytes) else name)
        except Exception:  # noqa: BLE001, S110 - no NVML (pynvml missing, driver gone): keep what was read
            pass
        devices.append(entry)
    return devices


def snapshot(*, trainer_pid: int | None, gpus: int, clock: CpuClock) -> dict[str, Any]:
    """The `system` field of a heartbeat; keys are left out, never guessed, when a reading fails."""
    out: dict[str, Any] = {"host": socket.gethostname(), "device": "cuda" if gpus else "cpu",
                           "time": time.time()}
    try:
        import psutil

        out["cpu_count"] = psutil.cpu_count() or os.cpu_count()
        memory = psutil.virtual_memory()
        out["ram_used_bytes"], out["ram_total_bytes"] = int(memory.total - memory.available), int(memory.total)
        if trainer_pid is not None:
            out["process"] = process_usage(trainer_pid, clock)
    except Exception:  # noqa: BLE001 - psutil missing or the trainer already gone: the rest still helps
        pass
    if gpus:
        out["gpus"] = gpu_usage(gpus)
    return out
