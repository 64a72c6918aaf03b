"""optim.optimizer: adamw8bit is refused before a run where it cannot run; state sizes; the shared RL optimiser."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from trainer.errors import InputError
from trainer.jobspec import SpecError, parse_spec
from trainer.optim import (
    adamw_state_bytes,
    build_optimizer,
    check_runtime,
    optimizer_state_bytes,
    runtime_problem,
)

SPEC = {"model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"}}


def _spec(**over):
    raw = {**SPEC, **over}
    return parse_spec(raw)


def test_adamw8bit_is_refused_on_a_cpu_machine_before_anything_loads(tmp_path):
    cfg = _spec(optim={"optimizer": "adamw8bit"}, model={"teacher": str(tmp_path / "no-such-teacher")})
    assert not torch.cuda.is_available()
    with pytest.raises(InputError, match=r"optim\.optimizer: adamw8bit needs a CUDA GPU"):
        check_runtime(cfg)
    from trainer.loop import train
    from trainer.sink import JsonlSink

    # train() checks before loading the (missing) teacher: the error names the optimiser, not the teacher.
    with pytest.raises(InputError, match=r"optim\.optimizer"):
        train(cfg, JsonlSink(tmp_path / "run"), run_dir=tmp_path / "run")
    with pytest.raises(InputError, match="optim.optimizer"):
        build_optimizer(torch.nn.Linear(2, 2), cfg.optim.generator, "adamw8bit")
    check_runtime(_spec())  # adamw runs anywhere


def test_runtime_problem_names_the_missing_library():
    assert "pip install 'flashdmd[gpu]'" in runtime_problem("adamw8bit", cuda=True, has_lib=False)
    assert runtime_problem("adamw8bit", cuda=True, has_lib=True) is None
    assert "torchao needs the torchao package" in runtime_problem("adamw8bit", backend="torchao", has_lib=False)
    assert runtime_problem("adamw8bit", backend="torchao", cuda=False, has_lib=True) is None  # runs on CPU


def test_spec_validation_refuses_what_no_machine_runs():
    with pytest.raises(SpecError, match="optim.optimizer: adamw8bit does not run with train.sharding: fsdp"):
        _spec(optim={"optimizer": "adamw8bit"}, train={"sharding": "fsdp", "num_processes": 2})
    with pytest.raises(SpecError, match="memory.ref_bf16 needs train.mixed_precision: bf16"):
        _spec(memory={"ref_bf16": True}, train={"mixed_precision": "no"})
    with pytest.raises(SpecError, match="optim.optimizer"):
        _spec(optim={"optimizer": "sgd"})
    with pytest.raises(SpecError, match="optim.adamw8bit_backend"):
        _spec(optim={"optimizer": "adamw8bit", "adamw8bit_backend": "apex"})
    assert _spec().optim.adamw8bit_backend == "bitsandbytes", "adamw8bit keeps meaning bitsandbytes"


def test_adamw_state_bytes_match_torch():
    net = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Conv2d(3, 8, 3))
    opt = build_optimizer(net, parse_spec(SPEC).optim.generator, "adamw")
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == adamw_state_bytes([p.numel() for p in net.parameters()], "adamw")
    # 8-bit: ~2 B/element for large tensors, fp32 for small ones (bitsandbytes' min_8bit_size)
    assert adamw_state_bytes([10**6], "adamw8bit") == pytest.approx(2 * 10**6, rel=0.02)
    assert adamw_state_bytes([100], "adamw8bit") == 800


def test_shared_rl_optimiser_is_the_generators(make_cfg):
    from trainer.distill import Distiller
    from trainer.models import load_teacher
    from trainer.reward import LatentRewardModel
    from trainer.rl import JointRL

    raw = make_cfg("sdxl").model_dump(mode="json")
    raw.update(kind="rl", rl={"threshold_min": -1.0, "threshold_max": -1.0, "optimizer": {"lr": 1e-3}},
               memory={"rl_optimizer": "shared"})
    cfg = parse_spec(raw)
    teacher = load_teacher(cfg.model)
    acc = Accelerator(cpu=True)
    reward = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution).eval().requires_grad_(False)
    rl = JointRL(Distiller.for_job(cfg, teacher, acc), reward, acc, rl=cfg.rl)
    assert rl.opt_rl is rl.distiller.opt_g and "rl" not in rl.optimizers()
    before = [p.detach().clone() for p in rl.generator.parameters()]
    logs = rl.rl_update(["a handwritten digit one"], 0)
    assert logs["rl/updated"] == 1.0 and logs["rl/lr"] == 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(before, rl.generator.parameters(), strict=True))


def test_torchao_backend_is_an_8bit_adamw_that_runs_on_this_cpu():
    """optim.adamw8bit_backend: torchao: 8-bit block-wise states (sized as adamw_state_bytes says), an AdamW
    update (close to torch's over a few steps), and the float learning rate our schedulers assign is used."""
    pytest.importorskip("torchao", reason="torchao is in the test extra (pip install -e '.[test]')")
    from torchao.optim.subclass_8bit import OptimState8bit

    cfg = _spec(optim={"optimizer": "adamw8bit", "adamw8bit_backend": "torchao"})
    check_runtime(cfg)  # no CUDA needed
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 3))  # 8192 quantised; the rest fp32
    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 3))
    ref.load_state_dict(net.state_dict())
    spec = cfg.optim.generator.model_copy(update={"lr": 1e-2})
    opt = build_optimizer(net, spec, "adamw8bit", "torchao")
    ref_opt = build_optimizer(ref, spec, "adamw")
    start = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(16, 64)
    for _ in range(5):
        for n, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            n(x).square().mean().backward()
            o.step()
    assert isinstance(opt.state[net[0].weight]["exp_avg"], OptimState8bit)
    assert not isinstance(opt.state[net[1].weight]["exp_avg"], OptimState8bit), "384 elements stay fp32"
    sizes = [p.numel() for p in net.parameters()]
    assert optimizer_state_bytes(opt) == adamw_state_bytes(sizes, "adamw8bit", "torchao")
    assert optimizer_state_bytes(opt) < 0.4 * adamw_state_bytes(sizes, "adamw")
    for p, r, p0 in zip(net.parameters(), ref.parameters(), start, strict=True):
        moved = (r - p0).norm()
        assert moved > 0 and (p - r).norm() < 0.1 * moved, "8-bit moments must give AdamW's update"
    assert isinstance(opt.param_groups[0]["lr"], float)
    for g in opt.param_groups:
        g["lr"] = 0.0  # a float, as set_learning_rates assigns: no update at all (decay is lr-scaled too)
    frozen = [p.detach().clone() for p in net.parameters()]
    net(x).square().mean().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, net.parameters(), strict=True))
