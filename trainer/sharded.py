"""Checkpoints of FSDP2-sharded runs (`train.sharding: fsdp` on several processes).

    sharded/     torch.distributed.checkpoint (DCP): every trainable network and every optimiser, each rank
                 writing its own shards in parallel; resume reads them back into the same sharding
    unet/ ...    the generator's full weights, gathered on rank 0, in the diffusers layout a single-process
                 run writes, so `flashdmd export` and `POST /generate` read it unchanged

Model and optimiser state go through one container module (a ModuleDict of the trainable networks), so the
keys are stable fully-qualified names ("generator.conv_in.weight", ...) whatever the world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # distill.py imports this module when it saves: a type only, no import circle
    from trainer.distill import Distiller

SHARDED_DIR = "sharded"


def _container(distiller: Distiller) -> nn.ModuleDict:
    return nn.ModuleDict(distiller.trainable_modules())


def _optimizers(distiller: Distiller) -> list[torch.optim.Optimizer]:
    return [getattr(o, "optimizer", o) for o in distiller.optimizers().values()]


def save_sharded(distiller: Distiller, path: Path) -> None:
    """Collective: every rank writes its shards of the weights (buffers included) and optimiser states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(_container(distiller), _optimizers(distiller))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(distiller: Distiller, path: Path) -> None:
    """Collective: read the shards back into the (identically sharded) networks and optimisers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    container, opts = _container(distiller), _optimizers(distiller)
    model_sd, optim_sd = get_state_dict(container, opts)  # the target layout (optimiser states initialised)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(container, opts, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_generator_state(distiller: Distiller) -> dict[str, torch.Tensor]:
    """Collective: the generator's full weights on the CPU (complete on rank 0, as torch returns them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(distiller.generator,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_on_meta(like: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model of `like`'s class and config holding `state`'s tensors themselves: built on the meta
    device (no random initialisation, no memory) and filled by `load_state_dict(assign=True)`, so the host
    holds the gathered weights once (an SDXL UNet is 10 GB in fp32), never beside a second, random copy."""
    with torch.device("meta"):
        net = type(like).from_config(like.config)
    net.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer is not in a state dict: it would stay on meta and fail to save
        raise RuntimeError(f"{type(like).__name__}: {len(left)} tensors were not in the gathered state, e.g. {left[0]}")
    return net


def export_full_generator(distiller: Distiller, state: dict[str, torch.Tensor], out: Path) -> str:
    """Rank 0: the teacher's denoiser class holding the gathered weights, saved with diffusers'
    save_pretrained: the same files a single-process run writes."""
    t = distiller.teacher
    full_model_on_meta(t.denoiser, state).save_pretrained(out / t.denoiser_name, safe_serialization=True)
    return t.denoiser_name
