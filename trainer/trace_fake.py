"""The fake-tensor world the memory trace runs in (trainer/trace.py): networks, teacher, data and trackers.

Everything here is built under torch's `FakeTensorMode`: tensors carry shapes, dtypes and storages of the
right size but no data, so a 2.6B-parameter SDXL UNet costs no memory and its forward costs only the
dispatch of each op. Three things of the real run cannot be followed on fake tensors, and each is replaced
by the nearest stand-in, said here and in the trace's output:

- data-dependent Python scalars (`loss.item()`, `bool(isfinite(loss))`, the step choice k): `ScalarMode`
  answers them with a fixed value (finite losses, the first choice). k only changes how many *no-grad*
  forwards the backward simulation and the rollout run, so it does not move the peak;
- `nonzero` (stage 2's kept pairs): every candidate group is kept, the most memory a rollout can need;
- text encoding: with `memory.text_cache` the real run reads cached embeddings too, so `encode` returns
  embeddings of the encoders' output shapes (the encoders, when on the GPU, are still built and counted).
"""

from __future__ import annotations

import contextlib
import json
import types
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from trainer.models import Cond, Teacher

TEXT_TOKENS = {"sdxl": 77, "sd15": 77, "sd3": 77 + 256}  # CLIP's 77; SD3 appends T5's 256


class _NoHooks:
    """Stands in for a frozen parameter's (grad hook, post-accumulate hook) pair: nothing to remove."""

    def remove(self) -> None:
        return None


_NO_HOOKS = (_NoHooks(), _NoHooks())


class ScalarMode(TorchDispatchMode):
    """Answer data-dependent ops on fake tensors: `.item()` / `bool()` get a fixed value, `nonzero` keeps all;
    and place "cpu:0" tensors on "cpu", as real CPU tensors are."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if isinstance(dev, torch.device) and dev.type == "cpu" and dev.index is not None:
            # accelerate's multi-process CPU device is "cpu:0": real CPU tensors drop the index, fake ones would
            # keep it (and FSDP2 would then find the parameters off its mesh's "cpu")
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if t.dtype == torch.bool:
                # isfinite(loss) -> True (no skip); masks such as "pair kept" -> True (the most memory)
                return True
            # ints: the first choice (step index k, the GAN step); floats: 1.0 (a finite loss or norm, and
            # AdamW's step count, which must not be 0)
            return 0 if not t.is_floating_point() else 1.0
        if func in (torch.ops.aten.nonzero.default,):
            t = args[0]
            return torch.stack(torch.meshgrid(*[torch.arange(s) for s in t.shape], indexing="ij"),
                               dim=-1).reshape(-1, t.dim())
        return func(*args, **kwargs)


def _step_temp(tracker: MemTracker, reftype: Any) -> Any:
    """The correction to torch's trackers: inside `optimizer.step()` they tag *every* new storage as optimiser
    state, so the step's temporaries (and, on fake DTensors, their sharding-propagation copies) inflate the
    peak's state figure: a Linear stack sharded 8 ways showed 4.1x (single-tensor AdamW) and 13.5x (foreach) its
    2 x params / 8. New storages in the step are tagged temporaries here; the states the optimiser keeps are
    re-tagged as state by the trackers' own post-step hook (`_track_optimizer_states`)."""
    if tracker._in_opt and reftype.name == "OPT":
        return type(reftype).TEMP
    return reftype


class CorrectedFSDPMemTracker(FSDPMemTracker):
    """torch's FSDPMemTracker with the optimiser-step correction (`_step_temp`)."""

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        super()._track(_step_temp(self, reftype), t)


class PeakTracker(MemTracker):
    """torch's MemTracker with a cheaper peak update, and the phase label at the peak.

    MemTracker updates a per-module peak for every active module after every op (O(modules) per op, 18 min
    for one SDXL UNet forward + backward on 2 cores; 22 s with this). The global peak is the same: the
    totals are kept by `_update_snap`, which this does not change.
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self._seen = WeakIdKeyDictionary()

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        super()._track(_step_temp(self, reftype), t)

    def _update_peak_stats(self, peak_state: Any) -> None:  # noqa: ARG002
        for dev, snap in self._curr_mem_snap.items():
            total = snap[_TOTAL_KEY]
            if self.phase_peaks.get(self.phase, 0) < total:
                self.phase_peaks[self.phase] = total
            if self._peak_mem.get(dev, 0) < total:
                self._peak_mem[dev] = total
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_phase = self.phase

    def _track_module_params_and_buffers(self, module: torch.nn.Module,
                                         install_grad_hooks: bool = True) -> tuple[int, int]:
        """As MemTracker's, but gradient hooks only on parameters that take gradients: MemTracker hooks every
        parameter of every module it enters, and `register_hook` refuses frozen ones (the teacher, the VAE)."""
        frozen = [p for p in module.parameters() if not p.requires_grad]
        for p in frozen:  # counted as parameters, but no hook: they never get a gradient
            self._update_and_maybe_create_winfos(p, _MemRefType.PARAM)
            self._param_to_grad_hook_handles.setdefault(p, _NO_HOOKS)
        try:
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        finally:
            for p in frozen:
                if self._param_to_grad_hook_handles.get(p) is _NO_HOOKS:
                    del self._param_to_grad_hook_handles[p]

    # MemTracker keeps per-module snapshots and refuses a module called again from the top level (a second
    # "iteration"); one training iteration calls the generator many times. These hooks keep what the totals
    # need: parameters and gradient hooks on first sight, and the recompute (activation-checkpointing) flag.
    def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:  # noqa: ARG002
        if module not in self._seen:
            self._seen[module] = True
            self._track_module_params_and_buffers(module, install_grad_hooks=True)
        elif self._mod_tracker.is_bw and self._ac_mod is None:
            self._ac_mod, self._in_ac = weakref.ref(module), True

    def _post_fw_hook(self, module: torch.nn.Module, inputs: Any, outputs: Any) -> None:  # noqa: ARG002
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod, self._in_ac = None, False

    def _pre_bw_hook(self, module: torch.nn.Module, args: Any) -> None:  # noqa: ARG002
        return None

    def _post_bw_hook(self, module: torch.nn.Module, args: Any) -> None:  # noqa: ARG002
        return None

    def peak(self) -> dict[str, int]:
        """The peak snapshot by category name (params, grads, ...), summed over devices."""
        out: dict[str, int] = {}
        for snap in self._peak_mem_snap.values():
            for k, v in snap.items():
                name = k if isinstance(k, str) and not hasattr(k, "value") else k.value
                out[name] = out.get(name, 0) + int(v)
        return out


def _arch_config(folder: Path, name: str) -> dict[str, Any] | None:
    p = folder / name / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def fake_teacher(spec: Any, on_gpu_text: bool) -> Teacher:
    """The teacher pipeline's networks built from their configs (call under FakeTensorMode)."""
    import diffusers
    import transformers

    from trainer.plan_nets import teacher_folder

    folder = teacher_folder(spec.model.teacher, spec.model.revision)
    index = json.loads((folder / "model_index.json").read_text())
    comps: dict[str, Any] = {}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        entry, cfg = index.get(name), _arch_config(folder, name)
        if not entry or not entry[0] or cfg is None:
            continue
        if name.startswith("text_encoder") and not on_gpu_text:
            continue  # memory.text_cache: the encoders stay on the CPU in the real run
        lib, cls_name = entry
        if lib == "diffusers":
            comps[name] = getattr(diffusers, cls_name).from_config(cfg)
        else:
            cls = getattr(transformers, cls_name)
            comps[name] = cls(cls.config_class(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    comps["scheduler"] = getattr(diffusers, index["scheduler"][1]).from_config(sched_cfg)
    from trainer.models import PIPELINE_FAMILY

    family = PIPELINE_FAMILY[index["_class_name"]]
    pipe = types.SimpleNamespace(**comps)
    teacher = Teacher(pipe, family, spec.model.teacher, spec.model.resolution, spec.schedule.shift)
    teacher.encode = types.MethodType(_fake_encode, teacher)  # type: ignore[method-assign]
    return teacher


def _fake_encode(self: Teacher, prompts: list[str]) -> Cond:
    """Embeddings of the text encoders' output shapes (what Teacher.encode / the text cache return)."""
    n, cfg = len(prompts), dict(self.denoiser.config)
    if self.family == "sd3":
        return Cond(torch.zeros(n, TEXT_TOKENS["sd3"], int(cfg["joint_attention_dim"])),
                    torch.zeros(n, int(cfg["pooled_projection_dim"])))
    embeds = torch.zeros(n, TEXT_TOKENS[self.family], int(cfg["cross_attention_dim"]))
    if self.family == "sdxl":
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
        return Cond(embeds, torch.zeros(n, pooled), self.time_ids(n))
    return Cond(embeds)


def fake_batches(spec: Any, teacher: Teacher, count: int, with_images: bool) -> list[dict[str, Any]]:
    """`count` micro-batches as the data loader yields them: captions and (for the Pixel-GAN) real images."""
    b, res = spec.train.batch_size, teacher.resolution
    out = []
    for i in range(count):
        batch: dict[str, Any] = {"caption": [f"caption {i}.{j}" for j in range(b)]}
        if with_images:
            batch["image"] = torch.zeros(b, 3, res, res)
        out.append(batch)
    return out


def fake_lrm(teacher: Teacher) -> Any:
    """An LRM of the reward path's architecture: a copy of the teacher's UNet and both text encoders (built
    from their configs and held, as the real LRM holds them); text is encoded to the encoders' output shapes."""
    import copy

    import transformers

    from trainer.plan_nets import teacher_folder
    from trainer.reward import LatentRewardModel, LRMText

    folder = teacher_folder(teacher.ref)
    index = json.loads((folder / "model_index.json").read_text())
    encoders = []
    for name in ("text_encoder", "text_encoder_2"):
        cfg = _arch_config(folder, name)
        if cfg is None or not index.get(name):
            continue
        cls = getattr(transformers, index[name][1])
        encoders.append(cls(cls.config_class(**{k: v for k, v in cfg.items() if not k.startswith("_")})))
    lrm = LatentRewardModel(copy.deepcopy(teacher.denoiser).float(), encoders, [None] * len(encoders),
                            resolution=teacher.resolution, trained=False)
    cfg = dict(teacher.denoiser.config)
    last = encoders[-1].config
    feat = int(getattr(last, "projection_dim", 0) or last.hidden_size)

    def encode(self: Any, prompts: Any) -> LRMText:
        n = len(prompts)
        hidden = torch.zeros(n, TEXT_TOKENS[teacher.family], int(cfg["cross_attention_dim"]))
        pooled = torch.zeros(n, feat)
        return LRMText(hidden, pooled if len(encoders) == 2 else None, pooled)

    lrm.encode = types.MethodType(encode, lrm)  # type: ignore[method-assign]
    return lrm.requires_grad_(False).eval()


class FreshCopyMode(TorchFunctionMode):
    """`copy.deepcopy` of fake tensors with new storages (the trainer deep-copies the teacher's denoiser into
    the generator and the fake score, and G into p_ref). torch's FakeCopyMode re-uses the source's fake tensor
    when it already belongs to the mode, so two copies of one network would share storage and be counted once."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.Tensor.__deepcopy__:
            src, memo = args
            if id(src) not in memo:
                with torch._C.DisableTorchFunctionSubclass():
                    out = src.detach().clone()
                if isinstance(src, torch.nn.Parameter):
                    out = torch.nn.Parameter(out, requires_grad=src.requires_grad)
                memo[id(src)] = out
            return memo[id(src)]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


@contextlib.contextmanager
def fake_module_moves(mode: Any) -> Iterator[None]:
    """Let `module.to(device / dtype)` work on fake parameters.

    `Module._apply` swaps a fake parameter with its moved copy (`torch.utils.swap_tensors`), which refuses
    tensors with weak references, and the fake mode's converter keeps them (its memo and its tensor describer).
    Nothing converts real tensors to fake ones here, so the memo can be emptied before each swap.
    """
    real = torch.utils.swap_tensors

    def swap(t1: torch.Tensor, t2: torch.Tensor) -> None:
        conv = mode.fake_tensor_converter.meta_converter
        conv.tensor_memo.clear()
        conv.describer.lookup_tensor.clear()  # FakeCopyMode's deepcopy describes the tensors it copies
        real(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = real
