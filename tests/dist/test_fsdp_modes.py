"""FSDP2 beside the other training modes on 2 CPU ranks, each against one process with the global batch:
gradient accumulation, the dmd2 baseline (its fake score collects stray gradients from G's latent-GAN
backward), and fp16 (GradScaler) under DDP and FSDP."""

from __future__ import annotations

import pytest
import torch
from distkit import STEPS, TINY, max_diff, weights

from trainer.sink import read_metrics

pytestmark = pytest.mark.slow

FSDP = ["--set", "train.sharding=fsdp"]
# Measured for FSDP without accumulation against the batch-4 process (tests/dist/test_fsdp.py): 1.5e-5.
FSDP_TOL = 5e-5


def _unet(run_dir, step: int = 3) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(run_dir / "checkpoints" / f"step-{step:08d}" / "unet")
    return {k: v.detach() for k, v in unet.state_dict().items()}


def _metrics(run_dir) -> dict[int, dict[str, float]]:
    return {r["step"]: r["metrics"] for r in read_metrics(run_dir)}


def _run(launch, tmp_path, name: str, nproc: int, *args: str):
    run_dir = tmp_path / name
    res = launch(nproc, *TINY, *STEPS, *args, "--run-dir", str(run_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_fsdp_with_grad_accum_matches_one_process_with_the_global_batch(launch, single_b4, tmp_path):
    # 2 ranks x batch 1 x 2 micro-batches: the unsharded gradients accumulate without a reduce-scatter
    # until the last micro-batch, with the generator and fake score gathered once for each phase.
    run_dir = _run(launch, tmp_path, "fsdp-accum", 2, *FSDP, "--set", "train.batch_size=1",
                   "--set", "train.grad_accum=2")
    assert max_diff(_unet(run_dir), weights(single_b4, 3, "generator")) < FSDP_TOL
    a, b = _metrics(run_dir), _metrics(single_b4)
    for step in (1, 2, 3):
        for key in ("grad_norm/generator", "grad_norm/fake_score", "grad_norm/discriminator"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-3), (step, key)


def test_dmd2_with_fsdp_matches_one_process(launch, tmp_path):
    # dmd2: TTUR 5 and the latent GAN on the fake score's features, through which G's backward leaves
    # gradients on the (sharded, not frozen) fake score; they must be cleared before its own update, or its
    # grad norm and weights drift from the one-process run's.
    dmd2 = ["--set", "distill.mode=dmd2"]
    single = _run(launch, tmp_path, "dmd2-b4", 1, *dmd2, "--set", "train.batch_size=4")
    sharded = _run(launch, tmp_path, "dmd2-fsdp", 2, *dmd2, *FSDP, "--set", "train.batch_size=2")
    assert max_diff(_unet(sharded), weights(single, 3, "generator")) < FSDP_TOL
    a, b = _metrics(sharded), _metrics(single)
    # grad norms are of the synchronised (global-batch) gradients; logged losses are rank 0's half only
    for step in (1, 2, 3):
        assert a[step]["grad_norm/fake_score"] == pytest.approx(b[step]["grad_norm/fake_score"], rel=1e-3), step


FP16 = ["--set", "train.mixed_precision=fp16"]


@pytest.fixture(scope="module")
def fp16_single(launch, tmp_path_factory):
    return _run(launch, tmp_path_factory.mktemp("fp16"), "fp16-b4", 1, *FP16, "--set", "train.batch_size=4")


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_fp16_on_two_ranks_matches_one_process(launch, fp16_single, tmp_path, sharding):
    # fp16 on a CPU: fp32 compute through a real GradScaler (trainer/parallel.py), so the scale, unscale and
    # skip path runs on 2 ranks with DDP buckets or FSDP2's sharded (DTensor) gradients.
    single, fp16 = fp16_single, FP16
    two = _run(launch, tmp_path, f"fp16-{sharding}", 2, *fp16, "--set", f"train.sharding={sharding}",
               "--set", "train.batch_size=2")
    got = _unet(two) if sharding == "fsdp" else weights(two, 3, "generator")
    assert max_diff(got, weights(single, 3, "generator")) < (FSDP_TOL if sharding == "fsdp" else 1e-5)
    a, b = _metrics(two), _metrics(single)
    assert a[3]["amp/scale"] == b[3]["amp/scale"] and a[3]["skipped/generator"] == 0.0
