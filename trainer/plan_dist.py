"""The distributed terms of `flashdmd plan` (trainer/plan.py): DDP's gradient buckets and FSDP2's gathers.

DDP (torch's Reducer) allocates flat gradient buckets as large as the wrapped network's trainable parameters
when it is built and keeps them all run. With `gradient_as_bucket_view=True` each `.grad` is a view into its
bucket, so the buckets *are* the gradients (no second copy); with it off, backward writes a separate `.grad`
and copies it into the bucket: twice the gradient memory. The plan models the view (trainer/parallel.py's
target design) and says so in the row.

FSDP2 (`fully_shard` per unit, trainer.parallel.shard_blocks) holds each unit's parameters sharded. A training
phase keeps its own network gathered for all its micro-batches (trainer.parallel.gathered(through_backward=True):
one all-gather per unit per phase, not one per forward), so the phase holds one whole unsharded copy of that
network in the MixedPrecisionPolicy's parameter dtype (bf16 under bf16 mixed precision, else fp32). The other
denoiser the phase only runs forward (the fake score in the generator's DM loss) is gathered unit by unit and
resharded after each forward: its largest unit and the prefetched next. Gradients: while accumulating, FSDP2 keeps
each unit's unsharded gradient in the reduce dtype (fp32) until the synchronising micro-batch (trainer/plan.py
counts those); the bf16 gradient a unit's backward produces (and the sum of a network's two uses in one loss,
Eq. 9) is converted unit by unit, so it stays small. The trace of sdxl-4step-8gpu (trainer/trace.py, fake group of
8) shows exactly this: parameters = shards + frozen nets + one bf16 generator; no second gradient set.
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


def fsdp_gather_bytes(phase_params: int, other_units: list[int], param_bytes: int) -> tuple[float, str]:
    """Bytes FSDP2 holds unsharded during a training phase: the phase's whole network (gathered once for the
    phase) and the largest unit of the other denoiser plus its prefetched next (gathered per forward)."""
    u1 = other_units[0] if other_units else 0
    u2 = other_units[1] if len(other_units) > 1 else 0
    total = param_bytes * (phase_params + u1 + u2)
    note = (f"the phase's network gathered for the phase ({phase_params / 1e6:,.1f}M params) + the other "
            f"denoiser's largest unit {u1 / 1e6:,.1f}M and the prefetched next {u2 / 1e6:,.1f}M, at {param_bytes} B")
    return float(total), note
