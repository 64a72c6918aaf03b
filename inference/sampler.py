"""The service's view of the one K-step sampler; the sampler itself is part of the method (trainer/sampling.py)."""

from trainer.sampling import image_grid, sample, to_uint8

__all__ = ["image_grid", "sample", "to_uint8"]
