"""The work one POST /generate asks for, and the budget it must fit (FLASHDMD_GENERATE_MAX_WORK).

A size bound alone is not enough: 2048x2048 is a normal request for a checkpoint trained at 1024 px and
4096 times the work (and far more memory in attention) for one trained at 32 px. So the unit of work is
one image at the checkpoint's own training resolution through one denoiser step:

    work = num_images x (width x height) / resolution^2 x steps                                       (1)

and a request above `generate_max_work` units is refused with 422 naming the fields that make it large.
The default, 128, admits 4 images at twice the training side (4x the pixels) with 8 steps.

Memory: one sampler call holds at most `rows` images, rows = generate_fixed_rows on the CPU (the batch is
padded to it) or generate_max_batch on GPUs, each of at most A = generate_max_work / steps times the
training resolution's pixels (1). Peak activation memory of a call is therefore at most rows x A x m, where
m is the activation memory of one image at the training resolution; see README "Waits and timeouts".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    units: float
    fields: list[str]  # what makes it large, for the 422

    def describe(self, budget: float) -> str:
        return (f"{', '.join(self.fields)}: this request is {self.units:g} units of work (images x pixels / "
                f"training pixels x steps) and one request may ask for {budget:g} "
                "(FLASHDMD_GENERATE_MAX_WORK); ask for fewer images, a smaller size or fewer steps")


def estimate(*, num_images: int, width: int, height: int, steps: int, resolution: int,
             default_steps: int) -> Work:
    """Eq. (1), and the fields above their neutral value (one image, the training size, the checkpoint's K)."""
    area = (width * height) / float(resolution * resolution)
    fields = []
    if num_images > 1:
        fields.append("num_images")
    if area > 1:
        fields += ["width", "height"]
    if steps > default_steps or not fields:
        fields.append("steps")
    return Work(num_images * area * steps, fields)
