"""Randomness keyed by the *global* sample index, so results do not depend on how a batch is split.

A data-parallel step over W ranks x A accumulation micro-batches x B samples sees the same global batch of
W*A*B samples as one process with batch W*A*B. If every noise draw came from one generator per rank, the two
runs would draw different noise for the same sample. Here sample g of step s owns its own `torch.Generator`
seeded from (seed, step, salt, g), and every per-sample draw (noise, timesteps, VAE posterior samples) takes
one row from it; draws that are one value for the whole batch (the step index k, the GAN timestep t_hat) come
from a `shared` generator that has no sample index, identical on every rank.

The functions `randn` / `randint` accept either a `SampleRNG` or a plain `torch.Generator` (or None), so the
pure schedule functions and the unit tests that pass a single generator keep working.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIX = (1_000_003, 7_919, 104_729, 15_485_863)


def mix_seed(seed: int, step: int, salt: int, index: int = -1) -> int:
    """A 63-bit seed from the key; distinct keys give (practically) independent streams."""
    return (seed * _MIX[0] + step * _MIX[1] + salt * _MIX[2] + (index + 1) * _MIX[3]) % 2**63


class SampleRNG:
    """One generator per global sample index, plus one shared generator for batch-level draws."""

    def __init__(self, seed: int, step: int, salt: int, indices: list[int]) -> None:
        self.indices = list(indices)
        self.generators = [torch.Generator().manual_seed(mix_seed(seed, step, salt, g)) for g in self.indices]
        self.shared = torch.Generator().manual_seed(mix_seed(seed, step, salt))

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """[B, ...]: row i from sample i's generator (B must equal the number of samples)."""
        if shape[0] != len(self.generators):
            raise ValueError(f"SampleRNG has {len(self.generators)} samples, asked for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators])

    def randint(self, low: int, high: int, batch: int) -> Tensor:
        if batch != len(self.generators):
            raise ValueError(f"SampleRNG has {len(self.generators)} samples, asked for {batch} integers")
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self.generators])

    def subset(self, rows: Tensor | list[int]) -> SampleRNG:
        """The same generators (shared state) for a subset of the rows, e.g. the kept RL pairs."""
        out = SampleRNG.__new__(SampleRNG)
        idx = [int(i) for i in rows]
        out.indices = [self.indices[i] for i in idx]
        out.generators = [self.generators[i] for i in idx]
        out.shared = self.shared
        return out


Gen = SampleRNG | torch.Generator | None


def randn(shape: tuple[int, ...], generator: Gen = None, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None) -> Tensor:
    """torch.randn drawn on the CPU (so CPU and GPU runs draw the same numbers), then moved to `device`."""
    if isinstance(generator, SampleRNG):
        out = generator.randn(tuple(shape), dtype)
    else:
        out = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    return out if device is None else out.to(device)


def randint(low: int, high: int, batch: int, generator: Gen = None,
            device: torch.device | str | None = None) -> Tensor:
    """[batch] integers in [low, high), one per sample."""
    if isinstance(generator, SampleRNG):
        out = generator.randint(low, high, batch)
    else:
        out = torch.randint(low, high, (batch,), generator=generator)
    return out if device is None else out.to(device)


def shared_choice(n: int, generator: Gen = None) -> int:
    """One index in [0, n) for the whole batch, equal on every rank (a SampleRNG's shared stream)."""
    g = generator.shared if isinstance(generator, SampleRNG) else generator
    return int(torch.randint(n, (1,), generator=g))


def vae_generators(generator: Gen) -> list[torch.Generator] | torch.Generator | None:
    """What diffusers' `latent_dist.sample(generator)` takes: a list gives one generator per sample."""
    return generator.generators if isinstance(generator, SampleRNG) else generator
