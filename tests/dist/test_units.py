"""In-process checks of the pieces the multi-process runs rely on, and of the method fixes."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from trainer.checkpoint import load_trainable, trainable_state
from trainer.jobspec import parse_spec
from trainer.data import ShardSampler
from trainer.distill import Distiller
from trainer.models import load_teacher, predict, teacher_x0
from trainer.rng import SampleRNG
from trainer.tiny import tiny_pipeline_dir


# ------------------------------------------------------------------ data shards and randomness
def _update(n: int, batch: int, world: int, accum: int, update: int, start: int = 0) -> list[list[int]]:
    """Every (micro, rank) index list of one update, in global order."""
    out = []
    for m in range(accum):
        for r in range(world):
            out.append(ShardSampler(n, batch, seed=3, rank=r, world=world, accum=accum, start=start).indices(update, m))
    return out


def test_ranks_read_disjoint_slices_of_one_global_order():
    n = 23
    two = _update(n, 2, world=2, accum=1, update=4)
    one = _update(n, 4, world=1, accum=1, update=4)
    accum = _update(n, 2, world=1, accum=2, update=4)
    assert not set(two[0]) & set(two[1]), "ranks 0 and 1 overlap"
    assert two[0] + two[1] == one[0] == accum[0] + accum[1]
    # across an epoch (23 samples, 4 per update) every sample is read once before any repeats
    seen = [i for u in range(6) for rank in _update(n, 2, 2, 1, u) for i in rank]
    assert sorted(seen[:n]) == list(range(n))


def test_a_resumed_sampler_continues_the_order_mid_epoch():
    full = iter(ShardSampler(10, 2, seed=1, rank=1, world=2))
    uninterrupted = [next(full) for _ in range(7)]
    resumed = iter(ShardSampler(10, 2, seed=1, rank=1, world=2, start=3))  # 3 updates done = 12 samples
    assert [next(resumed) for _ in range(4)] == uninterrupted[3:]
    assert ShardSampler(10, 2, seed=2, rank=1, world=2).indices(0, 0) != uninterrupted[0]


def test_noise_is_keyed_by_the_global_sample_index():
    whole = SampleRNG(0, 5, 2, [0, 1, 2, 3])
    halves = [SampleRNG(0, 5, 2, [0, 1]), SampleRNG(0, 5, 2, [2, 3])]
    for _ in range(2):  # two successive draws stay aligned per sample
        torch.testing.assert_close(whole.randn((4, 3)), torch.cat([h.randn((2, 3)) for h in halves]), rtol=0, atol=0)
        assert torch.equal(whole.randint(0, 1000, 4), torch.cat([h.randint(0, 1000, 2) for h in halves]))
    assert not torch.equal(SampleRNG(0, 6, 2, [0]).randn((1, 3)), SampleRNG(0, 5, 2, [0]).randn((1, 3)))


# ------------------------------------------------------------------ method fixes
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return lambda family: str(tiny_pipeline_dir(family, cache_root=root))


def _distiller(tiny, family: str = "sdxl", **train) -> Distiller:
    raw = {"model": {"teacher": tiny(family)}, "data": {"builtin": "digits"},
           "distill": {"real_guidance": 2.0, "discriminator": {"backbone": "tiny", "head_channels": 16}},
           "train": {"batch_size": 2, "mixed_precision": "no", **train}}
    if family == "sd3":
        raw["model"]["lora"] = {"rank": 2, "alpha": 2}
    cfg = parse_spec(raw)
    torch.manual_seed(0)
    return Distiller.for_job(cfg, load_teacher(cfg.model), Accelerator(cpu=True))


def test_lora_fake_score_adapters_start_equal_to_the_generators(tiny):
    d = _distiller(tiny, "sd3")
    gen = {n: p for n, p in d.generator.named_parameters() if p.requires_grad}
    fake = {n: p for n, p in d.fake.named_parameters() if p.requires_grad}
    assert gen.keys() == fake.keys() and any("lora_A" in n for n in gen)
    assert all(torch.equal(gen[n], fake[n]) for n in gen)
    assert any(gen[n].abs().sum() > 0 for n in gen if "lora_A" in n), "lora_A is random, not zero"


def test_spectral_norm_buffers_are_checkpointed(tiny, tmp_path):
    from safetensors.torch import save_file

    d = _distiller(tiny)
    state = {k: v.clone() for k, v in trainable_state(d.disc.heads).items()}
    assert any(k.endswith("._u") for k in state) and any(k.endswith("._v") for k in state)
    save_file(state, str(tmp_path / "d.safetensors"))
    name = next(k for k in state if k.endswith("._u"))
    with torch.no_grad():
        dict(d.disc.heads.named_buffers())[name].normal_()  # as if training had moved the estimate on
    assert not torch.equal(dict(d.disc.heads.named_buffers())[name], state[name])
    load_trainable(d.disc.heads, tmp_path / "d.safetensors", "cpu")
    assert torch.equal(dict(d.disc.heads.named_buffers())[name], state[name])


def test_teacher_x0_converts_in_fp32_from_the_fp32_x_t(tiny):
    d = _distiller(tiny, mixed_precision="bf16")  # the teacher denoiser is now bf16
    net = d.teacher.denoiser
    assert next(net.parameters()).dtype == torch.bfloat16
    x_t = torch.randn(d.teacher.latent_shape(2))
    t = torch.tensor([980, 980])
    cond = d.teacher.encode(["a", "b"])
    x0 = teacher_x0(net, x_t, t, cond, d.param)
    pred = predict(net, x_t.bfloat16(), t, cond.map(lambda v: v.bfloat16()), d.param).float()
    assert x0.dtype == torch.float32
    torch.testing.assert_close(x0, d.param.to_x0(x_t, pred, t), rtol=0, atol=1e-6)
    old = d.param.to_x0(x_t.bfloat16(), pred.bfloat16(), t).float()  # the bf16 conversion it replaces
    assert (old - x0).abs().max() > 1e-3


def test_generated_images_are_clamped_before_the_discriminator(tiny):
    d = _distiller(tiny)
    with torch.no_grad():
        d.teacher.vae.decoder.conv_out.weight.mul_(50)  # decoded images now far outside [-1, 1]
    seen: list[torch.Tensor] = []
    d.disc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    batch = {"caption": ["a", "b"], "image": torch.zeros(2, 3, 32, 32)}
    k = d.pick_step(0, True)
    _, xs, _ = d.generator_phase(d.micro_batches(batch, 0), k, 0, True)  # as training runs it (grad_accum 1)
    raw = d.teacher.decode(xs[0])
    assert raw.abs().max() > 1.5 and seen and all(s.abs().max() <= 1.0 for s in seen)


def test_fsdp_is_rejected_at_validation_where_it_is_not_supported():
    base = {"model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"}, "train": {"sharding": "fsdp"}}
    assert parse_spec(base).train.sharding == "fsdp"
    for extra in ({"model": {"teacher": "tiny:sd3", "lora": {"rank": 2}}}, {"kind": "rl"}):
        with pytest.raises(ValueError, match="train.sharding"):
            parse_spec({**base, **extra})


def test_the_trainer_imports_nothing_from_inference():
    # The sampler is part of the method (trainer/sampling.py); the dispatch by kind lives in flashjob/, above
    # both packages, so importing every stage-1 and stage-2 module must not pull in inference/.
    import subprocess
    import sys

    code = ("import sys, trainer.loop, trainer.rl_loop, trainer.distill, trainer.rl, trainer.checkpoint, "
            "trainer.sampling, trainer.parallel, trainer.sharded; "
            "print(sorted(m for m in sys.modules if m == 'inference' or m.startswith('inference.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    # Statically too: no module under trainer/ (the toy included) imports inference/, even lazily.
    import ast
    from pathlib import Path

    import trainer

    offenders = []
    for path in Path(trainer.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "inference" or n.startswith("inference.")]
    assert not offenders, offenders
    code = "import sys, flashjob.cli; print('trainer.loop' in sys.modules, 'inference.evaluate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", "the entry imports the job modules only when it runs one"


def test_fsdp_export_fills_a_meta_built_unet_with_the_gathered_weights(tiny, tmp_path):
    # The FSDP checkpoint's export (trainer/sharded.py): the full UNet is built on the meta device and takes
    # the gathered tensors themselves (assign=True), so the host never holds a second, randomly initialised
    # copy. A dispatch mode sees every op: no random init and no UNet-sized allocation may run off meta.
    from diffusers import UNet2DConditionModel
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainer.sharded import export_full_generator

    d = _distiller(tiny)
    state = {k: v.detach().clone() + 0.5 for k, v in d.generator.state_dict().items()}  # unlike any init
    total = sum(v.numel() * v.element_size() for v in state.values())

    class Allocations(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.inits, self.allocated = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if isinstance(out, torch.Tensor) and not out.is_meta:
                if name in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_"):
                    self.inits += 1
                if name.startswith("empty") or name in ("zeros", "ones", "randn", "rand"):
                    self.allocated += out.numel() * out.element_size()
            return out

    with Allocations() as seen:
        kind = export_full_generator(d, state, tmp_path)
    assert kind == "unet"
    assert seen.inits == 0, "parameters were randomly initialised off the meta device"
    assert seen.allocated < 0.05 * total, (seen.allocated, total)
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
