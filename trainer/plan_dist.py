"""The distributed terms of `flashdmd plan` (trainer/plan.py): DDP's gradient buckets and FSDP2's gathers.

DDP (torch's Reducer) allocates flat gradient buckets as large as the wrapped network's trainable parameters
when it is built and keeps them all run. With `gradient_as_bucket_view=True` each `.grad` is a view into its
bucket, so the buckets *are* the gradients (no second copy); with it off, backward writes a separate `.grad`
and copies it into the bucket: twice the gradient memory. The plan models the view (trainer/parallel.py's
target design) and says so in the row.

FSDP2 (`fully_shard` per unit, trainer.parallel.shard_blocks) holds each unit's parameters sharded; a unit is
all-gathered for its forward and backward and freed after, with the next unit prefetched. So at any moment one
unit is unsharded and the next is in flight, both in the parameter dtype of the MixedPrecisionPolicy (bf16
under bf16 mixed precision, else fp32). In backward the unit also holds its unsharded gradient (param dtype)
and the reduce-scatter input in the reduce dtype (fp32) until the scatter finishes.
"""

from __future__ import annotations

from typing import Any

# trainer/parallel.py's DDP setting modelled here (the target of the DDP review: grads as bucket views).
DDP_GRADIENT_AS_BUCKET_VIEW = True


def shard_units(denoiser: Any) -> list[int]:
    """Parameter counts of the FSDP2 units of a denoiser, largest first, from the runtime's own unit list
    (trainer.parallel.shard_blocks), plus the root's remaining parameters as one more unit."""
    from trainer.parallel import shard_blocks

    blocks = shard_blocks(denoiser)
    seen: set[int] = set()
    units = []
    for b in blocks:
        ps = [p for p in b.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        units.append(sum(p.numel() for p in ps))
    units.append(sum(p.numel() for p in denoiser.parameters() if id(p) not in seen))
    return sorted(units, reverse=True)


def fsdp_gather_bytes(units: list[int], param_bytes: int, reduce_bytes: int = 4) -> tuple[float, str]:
    """Bytes FSDP2 holds unsharded at the peak of a unit's backward: the unit and the prefetched next unit
    (param dtype), the unit's unsharded gradient (param dtype) and its reduce-scatter input (reduce dtype)."""
    u1 = units[0]
    u2 = units[1] if len(units) > 1 else 0
    total = param_bytes * (u1 + u2) + (param_bytes + reduce_bytes) * u1
    note = (f"largest unit {u1 / 1e6:,.1f}M + prefetched next {u2 / 1e6:,.1f}M params at {param_bytes} B, "
            f"its unsharded grad ({param_bytes} B) and reduce-scatter input ({reduce_bytes} B)")
    return float(total), note
