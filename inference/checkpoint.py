"""What a job checkpoint is, read from its `meta.json` and config files only (no weights, no torch).

The API validates a /generate request against this before it spends any time loading
weights, and lists the export formats of each checkpoint from it, so this module
must stay cheap to import: torch and diffusers are imported lazily elsewhere.

Layout (written by trainer/checkpoint.py):

    run_dir/checkpoints/step-XXXXXXXX/
        meta.json        {step, family, teacher, resolution, timesteps, num_steps, generator, shift, lora, ...}
        unet/ | transformer/ | lora/
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

FAMILIES = ("sdxl", "sd15", "sd3")
GENERATOR_KINDS = ("unet", "transformer", "lora")
# The order is the order the API lists them in.
FULL_FORMATS = ("diffusers", "unet")
LORA_FORMATS = ("diffusers", "unet", "lora", "lora-kohya")


class CheckpointError(ValueError):
    """The folder is not a usable checkpoint, or a request does not fit it. `field` names the culprit."""

    def __init__(self, message: str, field: str = "checkpoint") -> None:
        super().__init__(message)
        self.field = field


def export_formats(meta: dict[str, Any]) -> list[str]:
    """The `flashdmd export --format` values a checkpoint supports, from its meta.json (for listings)."""
    return list(LORA_FORMATS if meta.get("generator") == "lora" else FULL_FORMATS)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run directory (its latest checkpoint) or a `checkpoints/` folder."""
    p = Path(path).expanduser()
    if (p / "meta.json").is_file() or exported_card(p) is not None:
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            # meta.json is written last, so folders without it are incomplete and skipped.
            done = sorted(d for d in root.glob("step-*") if (d / "meta.json").is_file())
            if done:
                return done[-1]
    if not p.exists():
        raise CheckpointError(f"no such checkpoint: {p}")
    raise CheckpointError(f"{p} is neither a checkpoint (no meta.json) nor a run directory with checkpoints")


@dataclass(frozen=True)
class Geometry:
    """Image-size constraints of a model: what widths/heights the pipeline can produce."""

    vae_scale: int  # pixels per latent cell (8 for SDXL/SD3, 2 for the tiny models)
    patch: int  # SD3 patchifies latents; UNets do not (1)
    latent_channels: int
    max_latent: int | None  # SD3's position table bounds the latent side; None: no hard bound

    @property
    def multiple(self) -> int:
        return self.vae_scale * self.patch

    @property
    def max_side(self) -> int | None:
        return None if self.max_latent is None else self.max_latent * self.vae_scale


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    family: str
    teacher: str
    resolution: int
    timesteps: tuple[int, ...]
    generator: str  # "unet" | "transformer" | "lora"
    parameterisation: str
    shift: float | None
    lora: dict[str, Any] | None
    revision: str | None = None
    # Other step counts the generator was trained for ({K: [t...]}); K itself is always allowed.
    step_sets: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> CheckpointInfo:
        ckpt = resolve_checkpoint_dir(path).resolve()
        card = exported_card(ckpt)
        if card is not None and not (ckpt / "meta.json").is_file():
            return cls.from_meta(ckpt, card)
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{ckpt}/meta.json is unreadable: {err}") from None
        return cls.from_meta(ckpt, meta)

    @classmethod
    def from_meta(cls, ckpt: Path, meta: dict[str, Any]) -> CheckpointInfo:
        missing = [k for k in ("step", "family", "teacher", "resolution", "timesteps", "generator") if k not in meta]
        if missing:
            raise CheckpointError(f"{ckpt}/meta.json lacks {', '.join(missing)}")
        if meta["family"] not in FAMILIES:
            raise CheckpointError(f"{ckpt}: unknown family {meta['family']!r}")
        if meta["generator"] not in GENERATOR_KINDS:
            raise CheckpointError(f"{ckpt}: unknown generator kind {meta['generator']!r}")
        if not (ckpt / meta["generator"]).is_dir():
            raise CheckpointError(f"{ckpt}: the {meta['generator']}/ folder is missing")
        ts = tuple(int(t) for t in meta["timesteps"])
        if not ts or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
            raise CheckpointError(f"{ckpt}: timesteps {list(ts)} must be non-empty and decreasing")
        sets = {int(k): tuple(int(t) for t in v) for k, v in (meta.get("step_sets") or {}).items()}
        return cls(path=ckpt, step=int(meta["step"]), family=meta["family"], teacher=str(meta["teacher"]),
                   resolution=int(meta["resolution"]), timesteps=ts, generator=meta["generator"],
                   parameterisation=str(meta.get("parameterisation", "flow" if meta["family"] == "sd3" else "eps")),
                   shift=None if meta.get("shift") is None else float(meta["shift"]), lora=meta.get("lora"),
                   revision=_run_revision(ckpt), step_sets=sets)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def denoiser_name(self) -> str:
        return "transformer" if self.family == "sd3" else "unet"

    @property
    def id(self) -> str:
        """A short stable name: `<run dir name>/step-XXXXXXXX` (what X-Checkpoint carries)."""
        run = self.path.parent.parent.name if self.path.parent.name == "checkpoints" else self.path.parent.name
        return f"{run}/{self.path.name}"

    def allowed_steps(self) -> list[int]:
        return sorted({self.num_steps, *self.step_sets})

    def timesteps_for(self, steps: int | None) -> list[int]:
        """The timestep list for `steps` sampler steps (default: the checkpoint's own K)."""
        if steps is None or steps == self.num_steps:
            return list(self.timesteps)
        if steps in self.step_sets:
            return list(self.step_sets[steps])
        raise CheckpointError(f"this checkpoint was trained for {self.allowed_steps()} steps, not {steps}", "steps")

    def export_formats(self) -> list[str]:
        return export_formats({"generator": self.generator})

    def geometry(self) -> Geometry:
        return teacher_geometry(self.teacher, self.family, self.revision)

    def check_size(self, width: int | None, height: int | None, max_side: int) -> tuple[int, int]:
        """(width, height) defaulting to the training resolution; multiples of the VAE factor, within limits."""
        geo = self.geometry()
        w = self.resolution if width is None else width
        h = self.resolution if height is None else height
        limit = min(max_side, geo.max_side) if geo.max_side else max_side
        for name, v in (("width", w), ("height", h)):
            if v % geo.multiple:
                raise CheckpointError(f"{name} {v} is not a multiple of {geo.multiple} (the model's VAE factor"
                                      f"{' x patch size' if geo.patch > 1 else ''})", name)
            if not geo.multiple <= v <= limit:
                raise CheckpointError(f"{name} {v} is outside [{geo.multiple}, {limit}]", name)
        return w, h


def exported_card(folder: Path) -> dict[str, Any] | None:
    """An exported diffusers folder (`flashdmd export --format diffusers`) as checkpoint meta, else None.

    The folder is its own teacher (text encoders, VAE, scheduler) and holds the generator as its denoiser,
    so it loads, and serves with its serving.json, like the checkpoint it came from.
    """
    try:
        card = json.loads((folder / "flashdmd.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("format") != "diffusers" or not (folder / "model_index.json").is_file():
        return None
    return {"step": card.get("step", 0), "family": card.get("family"), "teacher": str(folder.absolute()),
            "resolution": card.get("resolution"), "timesteps": card.get("timesteps", []),
            "generator": "transformer" if card.get("family") == "sd3" else "unet",
            "shift": card.get("shift"), "lora": None, "step_sets": card.get("step_sets") or {}}


def _run_revision(ckpt: Path) -> str | None:
    """The teacher's hub revision, from the run's config.json (the checkpoint's meta does not carry it)."""
    cfg = ckpt.parent.parent / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model", {}).get("revision")
    except (OSError, ValueError, AttributeError):
        return None


def read_model_config(ref: str, sub: str, revision: str | None) -> dict[str, Any]:
    local = Path(ref) / sub / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download  # a hub id: the file is usually in the local cache already

    return json.loads(Path(hf_hub_download(ref, "config.json", subfolder=sub, revision=revision)).read_text())


def teacher_ref(teacher: str) -> str:
    """The folder or hub id of a checkpoint's teacher (tiny:<family> -> its cached folder)."""
    from trainer.errors import InputError
    from trainer.models import resolve_teacher

    try:
        return resolve_teacher(teacher)
    except InputError as err:
        raise CheckpointError(f"the checkpoint's teacher is unavailable: {err}") from None


@lru_cache(maxsize=64)
def teacher_geometry(teacher: str, family: str, revision: str | None = None) -> Geometry:
    """Read the VAE and denoiser configs of a teacher (tiny:<family>, folder or hub id) without weights."""
    ref = teacher_ref(teacher)
    try:
        vae = read_model_config(ref, "vae", revision)
        den = read_model_config(ref, "transformer" if family == "sd3" else "unet", revision)
    except Exception as err:  # missing files, hub errors (many types): one clear message
        raise CheckpointError(f"cannot read the configs of teacher {teacher!r}: {type(err).__name__}: {err}") from None
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    if family == "sd3":
        patch = int(den.get("patch_size", 2))
        table = den.get("pos_embed_max_size")
        return Geometry(scale, patch, int(den["in_channels"]), None if table is None else int(table) * patch)
    return Geometry(scale, 1, int(den["in_channels"]), None)
