"""`kind: eval` jobs: score checkpoints with the digits evaluator or the COCO-10k prompts protocol.

`run_eval(cfg, sink, run_dir=...)` is what `python -m flashjob <eval spec>` runs (flashjob.cli.run_job dispatches
on kind), so eval jobs go through the same worker, sink, exit codes and cancel path as training jobs. For each
checkpoint (ordinal i = 1, 2, ...) it generates images with the few-step sampler (image j: seed
`seed * 1000003 + j`, independent of the batch size), scores them, and logs the scores as metrics at step i
(`eval/<metric>`, with `eval/checkpoint_step` naming the checkpoint); a grid of the first images goes to
samples/step-<i>.png and everything to eval.json.

- digits: prompts "a handwritten digit <c>" for c = 0..9, `per_class` each; the digits evaluator's FD vs real,
  FD vs the teacher's 50-step CFG samples, accuracy and intra-class diversity (trainer/toy/evaluate.py).
- prompts: one image per prompt of `eval.prompts` (text: one per line; JSONL: caption or prompt), the first
  `max_prompts` of them (the COCO-10k protocol uses 10k captions), scored by `eval.scorers`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from trainer.errors import InputError, StopRequested
from trainer.jobspec import EvalJob
from trainer.roots import check_opened
from trainer.sink import Sink

if TYPE_CHECKING:
    from inference.pipeline import FewStepPipeline


def checkpoints_to_score(ref: str, steps: str | list[int]) -> list[Path]:
    """The step-* folders named by eval.checkpoint and eval.steps, oldest first."""
    from inference.checkpoint import CheckpointError, resolve_checkpoint_dir
    from trainer.checkpoint import checkpoint_dirs

    root = check_opened(ref, "eval.checkpoint", kind="model", runs_ok=True)  # again, after realpath
    if (root / "meta.json").is_file():
        if steps not in ("latest", "all"):
            raise InputError(f"eval.steps: {root} is one checkpoint; steps lists apply to a run directory")
        return [root]
    try:
        latest = resolve_checkpoint_dir(root)
    except CheckpointError as err:
        raise InputError(f"eval.checkpoint: {err}") from None
    if steps == "latest":
        return [latest]
    found = checkpoint_dirs(root if (root / "checkpoints").is_dir() else root.parent)
    if steps == "all":
        return found
    by_step = {int(p.name.split("-")[1]): p for p in found}
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise InputError(f"eval.steps: no complete checkpoints for steps {missing} in {root} "
                         f"(it has {sorted(by_step)})")
    return [by_step[s] for s in steps]


def read_prompts(path: str, limit: int | None) -> list[str]:
    p = check_opened(path, "eval.prompts")  # again where it is opened (trainer/roots.py)
    if not p.is_file():
        raise InputError(f"eval.prompts: no such file {p}")
    prompts: list[str] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"eval.prompts: {p} line {n} is not JSON: {err}") from None
            text = row.get("caption", row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise InputError(f"eval.prompts: {p} line {n} has no caption or prompt string")
            prompts.append(text)
        else:
            prompts.append(line.strip())
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise InputError(f"eval.prompts: {p} holds no prompts")
    return prompts


class DigitsProtocol:
    """The digits evaluator's metrics; the teacher-50 reference statistics come from the shipped cache."""

    def __init__(self, per_class: int) -> None:
        from trainer.jobspec import ModelSpec
        from trainer.models import load_teacher
        from trainer.toy.evaluate import default_evaluator
        from trainer.toy.prompts import digit_prompt
        from trainer.toy.reference import teacher_reference
        from trainer.toy.teacher_sampling import eval_labels

        self.labels = eval_labels(per_class)
        self.prompts = [digit_prompt(int(c)) for c in self.labels]
        self.evaluator = default_evaluator()
        self.reference = teacher_reference(load_teacher(ModelSpec(teacher="toy:digits")), self.evaluator,
                                           progress=False)

    @staticmethod
    def check(meta: dict[str, Any], ckpt: Path) -> None:
        from trainer.toy import TEACHER_DIR

        teacher = str(meta.get("teacher"))
        if teacher != "toy:digits" and Path(teacher).expanduser().resolve() != TEACHER_DIR.resolve():
            raise InputError(f"eval.protocol: digits scores checkpoints distilled from the digits teacher "
                             f"(toy:digits); {ckpt} was distilled from {teacher!r}; use protocol: prompts")

    def score(self, images: torch.Tensor) -> dict[str, float]:
        rep = self.evaluator.report(images, self.labels, self.reference)
        return {k: float(v) for k, v in rep.items() if k != "n"}


def _generate(pipe: FewStepPipeline, prompts: list[str], seed: int, batch: int, guidance: float,
              on_batch: Callable[[list[str], torch.Tensor], None]) -> torch.Tensor:
    out = []
    for lo in tqdm(range(0, len(prompts), batch), desc="generate", leave=False):
        chunk = prompts[lo:lo + batch]
        with torch.no_grad():
            lat = pipe.latents(chunk, [seed * 1_000_003 + lo + j for j in range(len(chunk))], guidance=guidance)
            images = pipe.decode(lat).clamp(-1, 1).float().cpu()
        on_batch(chunk, images)
        out.append(images)
    return torch.cat(out)


def run_eval(cfg: EvalJob, sink: Sink, *, run_dir: str | Path, resume: bool = False) -> int:
    """Score every selected checkpoint; returns the number scored. `resume` re-scores from the start."""
    from inference.checkpoint import CheckpointError
    from inference.pipeline import load_pipeline
    from inference.scorers import build_scorer
    from trainer.sampling import image_grid

    spec, run_dir = cfg.eval, Path(run_dir)
    if spec.checkpoint is None:
        raise InputError("eval.checkpoint is not set (eval.job is resolved by the service; give a path here)")
    ckpts = checkpoints_to_score(spec.checkpoint, spec.steps)
    if not ckpts:
        raise InputError(f"eval.checkpoint: {spec.checkpoint} has no complete checkpoints")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    digits = DigitsProtocol(spec.per_class) if spec.protocol == "digits" else None
    prompts = digits.prompts if digits else read_prompts(str(spec.prompts), spec.max_prompts)
    sink.log_event("started", f"scoring {len(ckpts)} checkpoint(s), {len(prompts)} images each, "
                   f"protocol {spec.protocol}", step=0, checkpoints=[str(c) for c in ckpts])
    scorers = [build_scorer(s, device) for s in spec.scorers]  # loaded once: bad weights fail before sampling
    results = []
    for i, ck in enumerate(ckpts, 1):
        meta = json.loads((ck / "meta.json").read_text())
        if digits:
            digits.check(meta, ck)
        for s in scorers:
            s.reset()
        try:
            pipe = load_pipeline(ck, device=device, dtype=dtype)
        except CheckpointError as err:
            raise InputError(f"eval.checkpoint: {err}") from None
        t0 = time.perf_counter()

        def on_batch(chunk: list[str], images: torch.Tensor, i: int = i) -> None:
            for s in scorers:
                s.update(images, chunk)
            if sink.should_stop():
                raise StopRequested(i - 1)

        images = _generate(pipe, prompts, spec.seed, spec.batch_size, spec.guidance, on_batch)
        scores: dict[str, float] = digits.score(images) if digits else {}
        for s in scorers:
            scores.update(s.result())
        seconds = time.perf_counter() - t0
        metrics = {f"eval/{k}": v for k, v in scores.items()}
        metrics.update({"eval/checkpoint_step": float(meta.get("step", -1)), "eval/seconds": seconds})
        sink.log_metrics(i, metrics)
        if spec.grid:
            path = run_dir / "samples" / f"step-{i:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images[:spec.grid], cols=min(spec.grid, 8)).save(path)
            sink.log_event("sample", f"first {min(spec.grid, len(images))} images of {ck}", step=i, path=str(path))
        results.append({"checkpoint": str(ck), "step": meta.get("step"), "images": len(images),
                        "seconds": round(seconds, 2), "scores": scores})
        sink.log_event("scored", f"{ck.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()), step=i,
                       checkpoint=str(ck), scores=scores)
        del pipe
    (run_dir / "eval.json").write_text(json.dumps({"spec": cfg.model_dump(mode="json"), "results": results},
                                                  indent=2))
    sink.log_event("finished", f"scored {len(ckpts)} checkpoint(s)", step=len(ckpts))
    return len(ckpts)
