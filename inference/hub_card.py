"""The model card and sample images that `flashdmd export --push-to-hub` puts next to an export.

Pure staging, no network: `stage_hub_folder` writes README.md (YAML metadata that the hub indexes, then a
body with the method, step count, usage, evaluation table, samples and the training spec) and copies the
run's sample grids into `samples/`. The upload itself is inference/hub_push.py, so what is pushed is exactly
what the export folder holds afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inference.checkpoint import CheckpointInfo
from inference.export import sampler_call
from trainer.jobspec.limits import is_hub_ref

FAMILY_TAGS = {"sdxl": "stable-diffusion-xl", "sd15": "stable-diffusion", "sd3": "stable-diffusion-3"}
SAMPLE = re.compile(r"^step-(\d+)(?:-\d+x\d+)?\.png$")
MAX_SAMPLE_BYTES = 20 << 20  # a grid of 256 large images is not a card picture


@dataclass(frozen=True)
class CardInputs:
    """What the card is made of, read from the checkpoint's run directory (or given)."""

    info: CheckpointInfo
    fmt: str
    spec: dict[str, Any] | None  # run_dir/config.json
    evaluation: list[dict[str, Any]]  # eval.json "results" rows
    samples: list[Path]  # sample grids of one step
    sample_step: int | None
    sample_cells: list[dict[str, Any]]  # step-N.json "cells" (prompt, seed, row, col), when written


def run_dir_of(info: CheckpointInfo) -> Path:
    return info.path.parent.parent if info.path.parent.name == "checkpoints" else info.path.parent


def _samples(run_dir: Path, step: int) -> tuple[list[Path], int | None, list[dict[str, Any]]]:
    """The grids at the checkpoint's step, else the latest step before it."""
    folder = run_dir / "samples"
    found: dict[int, list[Path]] = {}
    for p in sorted(folder.glob("step-*.png")) if folder.is_dir() else []:
        m = SAMPLE.match(p.name)
        if m and int(m.group(1)) <= step and p.stat().st_size <= MAX_SAMPLE_BYTES:
            found.setdefault(int(m.group(1)), []).append(p)
    if not found:
        return [], None, []
    best = max(found)
    meta = folder / f"step-{best:08d}.json"
    cells = json.loads(meta.read_text()).get("cells", []) if meta.is_file() else []
    # The main grid (step-N.png, the one the dashboard shows) first, then the other sizes.
    return sorted(found[best], key=lambda p: (len(p.name), p.name)), best, cells


def read_evaluation(path: Path, info: CheckpointInfo) -> list[dict[str, Any]]:
    """eval.json rows (inference/evaluate.py) for this checkpoint; all rows if none names it."""
    try:
        rows = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--eval {path}: not an eval.json written by an eval job: {err}") from None
    mine = [r for r in rows if Path(str(r.get("checkpoint", ""))).resolve() == info.path]
    return mine or rows


def gather(info: CheckpointInfo, fmt: str, eval_path: Path | None = None) -> CardInputs:
    run = run_dir_of(info)
    spec_file = run / "config.json"
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else None
    if eval_path is None and (run / "eval.json").is_file():
        eval_path = run / "eval.json"
    evaluation = read_evaluation(eval_path, info) if eval_path is not None else []
    samples, step, cells = _samples(run, info.step)
    return CardInputs(info, fmt, spec, evaluation, samples, step, cells)


def _usage(info: CheckpointInfo, fmt: str, repo_id: str) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in sampler_call(info).items())
    if fmt == "diffusers":
        load = f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")'
    elif fmt == "lora":
        load = (f'pipe = DiffusionPipeline.from_pretrained("{info.teacher}")\n'
                f'pipe.load_lora_weights("{repo_id}")\n'
                "# the few-step scheduler: see flashdmd.json (LCMScheduler, original_inference_steps = K)")
    else:
        return (f"`{fmt}` weights: see `flashdmd.json` for the timesteps and the pipeline call "
                f"({call}).\n")
    seed = ("torch.manual_seed(0)  # the scheduler re-noises from the global RNG\nimage = pipe(prompt, " + call
            + ").images[0]") if info.family == "sd3" else (
        "g = torch.Generator().manual_seed(0)\nimage = pipe(prompt, " + call + ", generator=g).images[0]")
    return (f"```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n{load}\n"
            f'prompt = "a photo of a cat"\n{seed}\n```\n')


def _eval_table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({k for r in rows for k in r.get("scores", {}) if not k.endswith("_std")})
    if not keys:
        return ""
    lines = ["| step | images | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        s = r.get("scores", {})
        lines.append(f"| {r.get('step')} | {r.get('images', '')} | "
                     + " | ".join(f"{s[k]:.4g}" if isinstance(s.get(k), int | float) else "" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def model_card(inputs: CardInputs, repo_id: str) -> str:
    """README.md text: YAML metadata (base_model, library_name, tags) and the body."""
    from huggingface_hub import ModelCard, ModelCardData

    info, k = inputs.info, inputs.info.num_steps
    tags = ["flashdmd", "flash-dmd", "distillation", "few-step", "text-to-image", FAMILY_TAGS[info.family]]
    if inputs.fmt.startswith("lora"):
        tags.append("lora")
    # The hub links base_model only to a hub id; a local teacher folder is named in the body instead.
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
                         base_model=info.teacher if is_hub_ref(info.teacher) else None)
    spec = inputs.spec or {}
    method = ("DMD2 (flashdmd's baseline mode: two time-scale updates, a latent GAN on the fake score)"
              if (spec.get("distill") or {}).get("mode") == "dmd2" else
              "Flash-DMD: distribution matching on the high-noise steps, a SAM-feature pixel GAN on the low-noise "
              "step, and EMA injection of the generator into the fake score")
    if spec.get("kind") == "rl":
        method += ", then fine-tuned with joint RL against a reward model"
    body = [f"# {repo_id}\n",
            f"A {k}-step text-to-image generator distilled from `{info.teacher}` ({info.family}) with {method}; "
            f"trained with flashdmd. Format: `{inputs.fmt}`.\n",
            f"- sampling steps: **{k}**, timesteps {list(info.timesteps)}, no classifier-free guidance",
            f"- training steps: {info.step}",
            f"- resolution: {info.resolution}" + (f", LoRA rank {info.lora.get('rank')}" if info.lora else "")
            + "\n",
            "## Usage\n", _usage(info, inputs.fmt, repo_id)]
    table = _eval_table(inputs.evaluation)
    if table:
        body += ["## Evaluation\n", table]
    if inputs.samples:
        body.append(f"## Samples (training step {inputs.sample_step})\n")
        body += [f"![{p.name}](samples/{p.name})" for p in inputs.samples]
        if inputs.sample_cells:
            body.append("\nRows are prompts, columns seeds:\n")
            seen: dict[str, list[int]] = {}
            for c in inputs.sample_cells:
                seen.setdefault(str(c.get("prompt")), []).append(int(c.get("seed", 0)))
            body += [f"- {p!r}: seeds {s}" for p, s in seen.items()]
        body.append("")
    if inputs.spec is not None:
        body += ["## Training spec\n", "```yaml", yaml.safe_dump(inputs.spec, sort_keys=False).rstrip(), "```\n"]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def stage_hub_folder(folder: Path, inputs: CardInputs, repo_id: str) -> Path:
    """Write README.md into the export folder and copy the sample grids to samples/; returns the folder."""
    if inputs.samples:
        (folder / "samples").mkdir(exist_ok=True)
        for p in inputs.samples:
            shutil.copyfile(p, folder / "samples" / p.name)
    (folder / "README.md").write_text(model_card(inputs, repo_id), encoding="utf-8")
    return folder
