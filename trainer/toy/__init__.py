"""The digits toy: a real, small SDXL-format teacher and a digits evaluator, both trained by our own code.

- `trainer.toy.teacher`: trains a tiny AutoencoderKL, two tiny CLIP text encoders and a text_time UNet on
  sklearn's digits (upsampled to 32x32 RGB) and saves a `StableDiffusionXLPipeline` folder. The trained folder
  ships in the repo at `TEACHER_DIR`; `flashdmd toy train-teacher` rebuilds it. Its components are built in
  `teacher_nets`, trained in `teacher_train`.
- `trainer.toy.evaluate`: a small digits CNN (shipped at `EVALUATOR_DIR`; `flashdmd toy train-evaluator` rebuilds
  it) and the metrics of a sample set on its features (`metrics`): prompt-adherence accuracy, digits-FD against
  real digits and against the teacher's 50-step CFG samples (`reference`, cached), and intra-class diversity.
- `trainer.toy.teacher_sampling`: the teacher's samplers for those metrics (euler, ddim, renoise).
- `trainer.toy.prompts`: the digits' captions, shared by the dataset, the text cache and the demo.
- `trainer.toy.reward`, `judge`, `memorisation`: the toy latent reward model, its independent judge, and the
  memorisation check.
- `trainer.toy.cli`: the `flashdmd toy` click group.

See `trainer/toy/README.md` for the commands and seeds that made the shipped files, and the measured numbers.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
TEACHER_DIR = HERE / "digits_teacher"  # the shipped StableDiffusionXLPipeline folder
EVALUATOR_DIR = HERE / "digits_evaluator"  # the shipped CNN weights and the teacher-50 reference statistics
TOY_TEACHERS = {"digits": TEACHER_DIR}  # `toy:<name>` teachers this package ships


def toy_teacher_dir(name: str) -> Path:
    """The folder of the shipped `toy:<name>` teacher, with errors a spec author can act on."""
    from trainer.errors import InputError

    if name not in TOY_TEACHERS:
        raise InputError(f"model.teacher: unknown toy model {name!r} ({', '.join(TOY_TEACHERS)})")
    folder = TOY_TEACHERS[name]
    if not (folder / "model_index.json").is_file():
        raise InputError(f"model.teacher: the {name} teacher is missing at {folder}; "
                         f"rebuild it with `flashdmd toy train-teacher`")
    return folder


RESOLUTION = 32  # pixels; the shipped teacher's default (VAE factor 4 -> 8x8x4 latents)
