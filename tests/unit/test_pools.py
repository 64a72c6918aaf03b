"""What a worker advertises, and which pool a job goes to (api/workers.py): pure functions, no servers."""

from __future__ import annotations

import os

import pytest

from api.settings import Settings
from api.workers import (
    Capacity,
    Pool,
    Router,
    choose_pool,
    detect_gpus,
    parse_pool,
    requested_processes,
    worker_capacity,
)


def _settings(tmp_path, **values) -> Settings:
    return Settings(data_dir=tmp_path, **values)


@pytest.mark.parametrize(
    ("gpus", "processes", "expected"),
    [
        (0, None, Capacity(0, 1)),  # a CPU worker offers one process unless told more
        (0, 4, Capacity(0, 4)),  # ... and FLASHDMD_WORKER_PROCESSES gloo processes when told
        (1, None, Capacity(1, 1)),
        (8, None, Capacity(8, 8)),  # a GPU worker offers one process per GPU
        (8, 2, Capacity(8, 2)),  # ... or fewer
    ],
)
def test_worker_capacity(tmp_path, gpus, processes, expected) -> None:
    capacity = worker_capacity(_settings(tmp_path, worker_gpus=gpus, worker_processes=processes))
    assert capacity == expected
    assert capacity.pool == f"{'gpu' if gpus else 'cpu'}{expected.processes}"


def test_a_gpu_worker_never_offers_more_processes_than_gpus(tmp_path) -> None:
    with pytest.raises(ValueError, match="more than this worker's 2 GPU"):
        worker_capacity(_settings(tmp_path, worker_gpus=2, worker_processes=3))


def test_hidden_gpus_count_as_none_without_loading_torch(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == 0


def test_detect_gpus_matches_torch_and_leaves_the_environment_alone(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    assert detect_gpus() == torch.cuda.device_count()
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ


def test_pool_names() -> None:
    assert parse_pool("gpu8") == Pool(8, "gpu", False) and parse_pool(" cpu2 ", live=True) == Pool(2, "cpu", True)
    assert parse_pool("gpu8").name == "gpu8"
    for bad in ("gpu0", "gpu", "tpu4", "gpu8x", "GPU8", ""):
        with pytest.raises(ValueError, match="not a pool name"):
            parse_pool(bad)


def test_settings_read_pools_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FLASHDMD_POOLS", "gpu1,gpu8")
    monkeypatch.setenv("FLASHDMD_WORKER_PROCESSES", "2")
    settings = _settings(tmp_path)
    assert settings.pools == ["gpu1", "gpu8"] and settings.worker_processes == 2 and settings.queue == "train"


def test_choose_pool_takes_the_smallest_that_fits() -> None:
    gpu1, gpu8, cpu2 = Pool(1, "gpu", True), Pool(8, "gpu", True), Pool(2, "cpu", True)
    pools = [gpu8, cpu2, gpu1]
    assert choose_pool(pools, 1) == gpu1
    assert choose_pool(pools, 2) == cpu2
    assert choose_pool(pools, 3) == gpu8
    assert choose_pool(pools, 9) is None
    assert choose_pool([], 1) is None
    # Same size: live before declared, GPU before CPU.
    declared_gpu2 = Pool(2, "gpu", False)
    assert choose_pool([declared_gpu2, cpu2], 2) == cpu2
    assert choose_pool([Pool(2, "cpu", False), declared_gpu2], 2) == declared_gpu2


def test_requested_processes() -> None:
    assert requested_processes({"kind": "distill", "train": {"num_processes": 4}}) == 4
    assert requested_processes({"kind": "rl", "train": {"num_processes": 2}}) == 2
    assert requested_processes({"kind": "distill"}) == 1  # the spec default
    assert requested_processes({"kind": "eval", "train": {"num_processes": 8}}) == 1  # eval runs one process


def test_a_misspelt_declared_pool_stops_the_api_at_start(tmp_path) -> None:
    with pytest.raises(ValueError, match="'gpu-8' is not a pool name"):
        Router(_settings(tmp_path, pools=["gpu1", "gpu-8"]))
