"""Pluggable image scorers for eval jobs (the COCO-10k protocol), loaded from local weights the user supplies.

Every scorer takes images [B, 3, H, W] in [-1, 1] with their prompts through `update`, and `result()` gives
{metric: mean, metric_std: std} (FID gives one number). Weights never download here: `path` is a local folder.

- clip:       CLIPScore = 100 * max(cos(E_img, E_txt), 0) (Hessel et al. 2021; torchmetrics' convention), any
              transformers `CLIPModel` folder (e.g. openai/clip-vit-large-patch14, saved locally).
- pickscore:  exp(logit_scale) * cos, PickScore's own scoring, on its released transformers folder
              (yuvalkirstain/PickScore_v1; processor from laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
- hpsv2:      cos(E_img, E_txt), HPSv2's score, on a transformers `CLIPModel` folder holding the HPSv2 weights.
              The released HPS_v2_compressed.pt is an open_clip checkpoint: convert it to a CLIPModel folder first
              (open_clip needs torchvision, which this project does not require).
- imagereward: ImageReward's head on BLIP: the text encoder's [CLS] state with cross-attention to the ViT's
              patch features -> MLP (768-1024-128-64-16-1) -> (r - 0.16717) / 1.03334. The folder is a
              transformers `BlipForImageTextRetrieval` folder plus `imagereward_head.safetensors` (keys
              layers.{0,2,4,6,7}.{weight,bias}, as in ImageReward.pt's `mlp.*`).
- fid:        Frechet distance of detector features against reference statistics. The detector is a TorchScript
              file called as `net(uint8 images, return_features=True)` -> [B, D] (NVlabs'
              inception-2015-12-05.pt, as used by EDM/StyleGAN3); the reference an .npz with `mu` and `sigma` (EDM's
              format) or a folder of images.
Image preprocessing follows the folder's preprocessor_config.json (resize, centre crop, mean/std) in torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.errors import InputError
from trainer.hub import resolve_weights
from trainer.jobspec import ScorerSpec
from trainer.roots import check_opened

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Scorer(Protocol):
    name: str

    def update(self, images: Tensor, prompts: Sequence[str]) -> None: ...
    def result(self) -> dict[str, float]: ...
    def reset(self) -> None: ...


# ----------------------------------------------------------------------------------------------- preprocessing


class Preprocess:
    """[-1, 1] images -> the model's pixel_values, as its preprocessor_config.json says (CLIP defaults)."""

    def __init__(self, folder: Path, default_size: int) -> None:
        cfg = json.loads((folder / "preprocessor_config.json").read_text()) \
            if (folder / "preprocessor_config.json").is_file() else {}
        size, crop = cfg.get("size", default_size), cfg.get("crop_size", None)
        if isinstance(size, dict) and "height" in size:  # a fixed resize (BLIP)
            self.resize: tuple[int, int] | int = (int(size["height"]), int(size["width"]))
        else:  # the shortest edge (CLIP), then a centre crop
            self.resize = int(size.get("shortest_edge", default_size) if isinstance(size, dict) else size)
        crop = crop if crop is not None else (None if isinstance(self.resize, tuple) else self.resize)
        self.crop = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else \
            ((int(crop), int(crop)) if crop else None)
        self.mean = torch.tensor(cfg.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", CLIP_STD)).view(1, 3, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        x = ((images.float() + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        if isinstance(self.resize, tuple):
            size = self.resize
        else:
            s = self.resize / min(h, w)
            size = (max(round(h * s), 1), max(round(w * s), 1))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean) / self.std


def _local_checked(spec: ScorerSpec) -> None:
    """A local scorer path is checked again where it is opened (trainer/roots.py); a hub reference is not a path."""
    if os.path.isabs(os.path.expanduser(str(spec.path))):
        check_opened(str(spec.path), f"eval.scorers ({spec.kind}).path", kind="model")


def _folder(spec: ScorerSpec) -> Path:
    _local_checked(spec)
    path = resolve_weights(spec.path, f"eval.scorers ({spec.kind}).path", want="folder")  # hub id or folder
    if not path.is_dir():
        raise InputError(f"eval.scorers ({spec.kind}).path: no such folder {path}")
    return path


def _tensor(out: Any) -> Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; the projected embedding is its pooler_output."""
    return out if isinstance(out, Tensor) else out.pooler_output


class _Mean:
    """Per-image scores, reported as mean and std."""

    name: str

    def __init__(self) -> None:
        self.values: list[Tensor] = []

    def reset(self) -> None:
        self.values = []

    def result(self) -> dict[str, float]:
        v = torch.cat(self.values).double() if self.values else torch.zeros(0, dtype=torch.float64)
        if not len(v):
            return {}
        return {self.name: float(v.mean()), f"{self.name}_std": float(v.std()) if len(v) > 1 else 0.0}


# ------------------------------------------------------------------------------------- CLIP-family scorers


class ClipFamilyScorer(_Mean):
    """clip / pickscore / hpsv2: cosine of projected CLIP embeddings, then the scorer's own scale."""

    def __init__(self, spec: ScorerSpec, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        super().__init__()
        folder = _folder(spec)
        try:
            self.model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False).to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise InputError(f"eval.scorers ({spec.kind}).path: {folder} is not a CLIPModel folder with a "
                             f"tokenizer: {err}") from None
        self.kind, self.name, self.device = spec.kind, spec.metric, device
        self.preprocess = Preprocess(folder, self.model.config.vision_config.image_size)
        self.max_length = min(getattr(self.tokenizer, "model_max_length", 77),
                              self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        img = _tensor(self.model.get_image_features(pixel_values=self.preprocess(images).to(self.device)))
        txt = _tensor(self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))
        return F.cosine_similarity(img.float(), txt.float(), dim=-1)

    def scale(self, cos: Tensor) -> Tensor:
        if self.kind == "clip":
            return 100 * cos.clamp(min=0)
        if self.kind == "pickscore":
            return self.model.logit_scale.exp().float() * cos
        return cos  # hpsv2

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        self.values.append(self.scale(self.cosine(images, prompts)).cpu())


# -------------------------------------------------------------------------------------------- ImageReward


class ImageRewardHead(nn.Module):
    """ImageReward's MLP (dropouts are no-ops at eval; the indices match its state dict)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageRewardScorer(_Mean):
    HEAD = "imagereward_head.safetensors"
    MAX_LENGTH = 35  # ImageReward's prompt length

    def __init__(self, spec: ScorerSpec, device: torch.device | str = "cpu") -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        super().__init__()
        folder = _folder(spec)
        if not (folder / self.HEAD).is_file():
            raise InputError(f"eval.scorers (imagereward).path: {folder} has no {self.HEAD}")
        try:
            blip = BlipForImageTextRetrieval.from_pretrained(folder).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise InputError(f"eval.scorers (imagereward).path: {folder} is not a BLIP retrieval folder: {err}") \
                from None
        self.vision, self.text = blip.vision_model.to(device), blip.text_encoder.to(device)
        self.head = ImageRewardHead(blip.config.text_config.hidden_size).eval().requires_grad_(False).to(device)
        self.head.load_state_dict(load_file(str(folder / self.HEAD)))
        self.preprocess = Preprocess(folder, blip.config.vision_config.image_size)
        self.name, self.device = spec.metric, device

    @torch.no_grad()
    def raw(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The head's output before ImageReward's normalisation, [B]."""
        px = self.preprocess(images).to(self.device)
        image_embeds = self.vision(pixel_values=px).last_hidden_state
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.MAX_LENGTH,
                             return_tensors="pt").to(self.device)
        text = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device))
        return self.head(text.last_hidden_state[:, 0].float()).squeeze(-1)

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        self.values.append(((self.raw(images, prompts) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).cpu())


# --------------------------------------------------------------------------------------------------- FID


def to_uint8(images: Tensor) -> Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FIDScorer:
    def __init__(self, spec: ScorerSpec, device: torch.device | str = "cpu") -> None:
        _local_checked(spec)
        path = resolve_weights(spec.path, "eval.scorers (fid).path", want="file", suffixes=(".pt", ".pth"))
        if not path.is_file():
            raise InputError(f"eval.scorers (fid).path: no such file {path} (a TorchScript detector)")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise InputError(f"eval.scorers (fid).path: {path} is not a TorchScript file: {err}") from None
        self.name, self.device, self.batch_size = spec.metric, device, spec.batch_size
        self.features: list[Tensor] = []
        self.reference = self._reference(check_opened(str(spec.reference), "eval.scorers (fid).reference"))

    @torch.no_grad()
    def detect(self, images: Tensor) -> Tensor:
        return self.net(to_uint8(images).to(self.device), return_features=True).double().cpu()

    def _reference(self, ref: Path) -> tuple[np.ndarray, np.ndarray]:
        from trainer.toy.metrics import feature_stats

        if ref.is_file() and ref.suffix == ".npz":
            with np.load(ref) as st:
                if "mu" not in st or "sigma" not in st:
                    raise InputError(f"eval.scorers (fid).reference: {ref} needs arrays mu and sigma")
                return st["mu"].astype(np.float64), st["sigma"].astype(np.float64)
        if ref.is_dir():
            from PIL import Image

            files = sorted(p for p in ref.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) < 2:
                raise InputError(f"eval.scorers (fid).reference: {ref} holds fewer than 2 images")
            feats = []
            for i in range(0, len(files), self.batch_size):
                arrs = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files[i:i + self.batch_size]]
                x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1
                feats.append(self.detect(x))
            return feature_stats(torch.cat(feats))
        raise InputError(f"eval.scorers (fid).reference: {ref} is neither an .npz file nor a folder of images")

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        self.features.append(self.detect(images))

    def reset(self) -> None:
        self.features = []

    def result(self) -> dict[str, float]:
        from trainer.toy.metrics import fd_from_stats, feature_stats

        if sum(len(f) for f in self.features) < 2:
            return {}
        value = fd_from_stats(*feature_stats(torch.cat(self.features)), *self.reference)
        return {self.name: value} if math.isfinite(value) else {}


SCORERS: dict[str, Any] = {"clip": ClipFamilyScorer, "pickscore": ClipFamilyScorer, "hpsv2": ClipFamilyScorer,
                           "imagereward": ImageRewardScorer, "fid": FIDScorer}


def build_scorer(spec: ScorerSpec, device: torch.device | str = "cpu") -> Scorer:
    return SCORERS[spec.kind](spec, device)
