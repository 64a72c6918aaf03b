"""Reward models for stage 2 (Sec. 3.4, Appendix 6): one interface, `score(latents, t, cond) -> [B]`.

* `LatentRewardModel` (LRM, shared/reference/lrm_sam.md §A.2). Built from any `UNet2DConditionModel`: the
  last-layer output of every down stage and the mid-block output are average-pooled and concatenated, a
  bias-free `visual_projection` maps them to the text width, and the score is exp(logit_scale) times the
  cosine with the pooled text feature. Visual feature enhancement (VFE) runs the UNet on the prompt and on
  "" and applies CFG to the pooled mid feature only. Noisy latents z_t go straight into the UNet at their
  integer t: no VAE, no re-noising. The up blocks never run.
* `PixelReward`: the fallback for comparison. It (optionally) denoises to x0, decodes with the VAE and scores
  the images with a registered image scorer.

Released checkpoint layout (LPO's `save()`): `unet/`, `text_encoder/` (+ `text_encoder_2/` for SDXL) and
`state_dict.pt` = {"visual_projection": Linear.state_dict(), "logit_scale": float, ["text_projection": ...]}.
We also write `tokenizer*/` and `lrm_config.json`; the loader works without them (given a base pipeline).
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_SCALE_INIT = 2.6592  # ln(1/0.07), CLIP's and LRM's initial logit scale
VFE_SCALE = 7.5
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")


class RewardModel(Protocol):
    def score(self, latents: Tensor, t: Tensor, cond: Sequence[str]) -> Tensor:
        """latents [B, C, H, W] at integer timesteps t [B], prompts cond (B strings) -> scores [B]."""
        ...


@dataclass
class LRMText:
    hidden: Tensor  # [B, L, D] cross-attention states
    added: Tensor | None  # [B, P] SDXL `text_embeds` (pooled text_encoder_2), None for SD1.5-style UNets
    feature: Tensor  # [B, P] the pooled text feature of the cosine

    def index(self, idx: Tensor) -> LRMText:
        return LRMText(self.hidden[idx], None if self.added is None else self.added[idx], self.feature[idx])


class _Stop(Exception):
    pass


def visual_feature_dim(unet: nn.Module) -> int:
    """Width of the concatenated pooled features: every down stage's channels plus the mid block's."""
    chans = list(unet.config.block_out_channels)
    return sum(chans[: len(unet.down_blocks)]) + chans[-1]


class LatentRewardModel(nn.Module):
    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], tokenizers: list[Any], *,
                 resolution: int, vfe_scale: float = VFE_SCALE, trained: bool = True) -> None:
        super().__init__()
        if getattr(unet, "mid_block", None) is None or not hasattr(unet, "down_blocks"):
            raise TypeError(f"the LRM needs a UNet2DConditionModel with a mid block, got {type(unet).__name__}")
        if len(text_encoders) != len(tokenizers) or not 1 <= len(text_encoders) <= 2:
            raise ValueError("the LRM takes one or two (text encoder, tokenizer) pairs")
        self.unet = unet
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.resolution, self.vfe_scale, self.trained = int(resolution), float(vfe_scale), trained
        self.text_time = unet.config.addition_embed_type == "text_time"  # SDXL micro-conditioning
        last = text_encoders[-1]
        has_proj = hasattr(last, "text_projection")
        text_dim = int(last.config.projection_dim if has_proj else last.config.hidden_size)
        # SD1.5's LRM adds a text projection (initialised from CLIP's); without CLIP at hand we start at identity.
        self.text_projection: nn.Linear | None = None
        if not has_proj:
            self.text_projection = nn.Linear(text_dim, text_dim, bias=False)
            nn.init.eye_(self.text_projection.weight)
        self.visual_projection = nn.Linear(visual_feature_dim(unet), text_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pipeline(cls, pipe: Any, *, resolution: int, vfe_scale: float = VFE_SCALE,
                      seed: int = 0) -> LatentRewardModel:
        """An UNTRAINED LRM (random projection) on copies of a pipeline's UNet and text encoders."""
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise TypeError("the LRM needs a UNet teacher (SDXL/SD1.5); use rl.reward.kind: pixel for SD3")
        encoders = [copy.deepcopy(getattr(pipe, n)).float() for n in TEXT_ENCODERS if getattr(pipe, n, None)]
        tokenizers = [getattr(pipe, n) for n in TOKENIZERS if getattr(pipe, n, None)][: len(encoders)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(copy.deepcopy(unet).float(), encoders, tokenizers, resolution=resolution,
                       vfe_scale=vfe_scale, trained=False)

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    # ---------------------------------------------------------------- text
    def encode(self, prompts: Sequence[str]) -> LRMText:
        """SDXL: penultimate hidden states of both encoders concatenated, pooled text_encoder_2 projection.
        SD1.5: the last hidden state, and the pooled EOS output through `text_projection`."""
        outs = []
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            outs.append(enc(ids, output_hidden_states=True))
        if len(outs) == 2:
            hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)  # [B, L, D1 + D2]
            pooled = outs[-1].text_embeds  # [B, P]
            return LRMText(hidden, pooled, pooled)
        out = outs[0]
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return LRMText(out.last_hidden_state, None, pooled)

    def encode_unique(self, prompts: Sequence[str]) -> LRMText:
        """Encode each distinct prompt once (candidates repeat their prompt k times)."""
        uniq = list(dict.fromkeys(prompts))
        where = {p: i for i, p in enumerate(uniq)}
        return self.encode(uniq).index(torch.tensor([where[p] for p in prompts], device=self.device))

    # ---------------------------------------------------------------- vision
    def _unet_features(self, x: Tensor, t: Tensor, text: LRMText) -> tuple[list[Tensor], Tensor]:
        """Run the down and mid blocks only; returns (per-stage last-layer outputs, mid output)."""
        downs: list[Tensor] = []
        mid: list[Tensor] = []

        def down_hook(n_layers: int) -> Callable[..., None]:
            def hook(_m: nn.Module, _i: object, out: tuple[Tensor, tuple[Tensor, ...]]) -> None:
                downs.append(out[1][n_layers - 1])  # the stage's last resnet/attention output, pre-downsample
            return hook

        def mid_hook(_m: nn.Module, _i: object, out: Tensor) -> None:
            mid.append(out)
            raise _Stop  # the up blocks never run

        handles = [b.register_forward_hook(down_hook(len(b.resnets))) for b in self.unet.down_blocks]
        handles.append(self.unet.mid_block.register_forward_hook(mid_hook))
        added = None
        if self.text_time:
            r = float(self.resolution)
            time_ids = torch.tensor([[r, r, 0.0, 0.0, r, r]], device=x.device).expand(x.shape[0], 6)
            added = {"text_embeds": text.added, "time_ids": time_ids}
        try:
            self.unet(x, t, encoder_hidden_states=text.hidden, added_cond_kwargs=added, return_dict=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return downs, mid[0]

    def visual_features(self, latents: Tensor, t: Tensor, text: LRMText, uncond: LRMText | None) -> Tensor:
        """Pooled, concatenated down + mid features with VFE on the mid feature: [B, D_vis]."""
        b = latents.shape[0]
        dtype = self.unet.dtype
        x, tt, txt = latents.to(dtype), t.to(latents.device).long(), text
        if uncond is not None:  # one batched pass: [cond; uncond]
            u = uncond.index(torch.zeros(b, dtype=torch.long, device=self.device))
            x, tt = torch.cat([x, x]), torch.cat([tt, tt])
            txt = LRMText(torch.cat([text.hidden, u.hidden]),
                          None if text.added is None else torch.cat([text.added, u.added]), text.feature)
        downs, mid = self._unet_features(x, tt, txt)
        pooled = [d.float().mean(dim=(2, 3))[:b] for d in downs]  # conditional branch only, [B, C_i]
        m = mid.float().mean(dim=(2, 3))  # [B or 2B, C_mid]
        if uncond is not None:
            m_c, m_u = m[:b], m[b:]
            m = m_u + self.vfe_scale * (m_c - m_u)  # VFE: CFG on the pooled mid feature
        return torch.cat([*pooled, m], dim=-1)  # [B, D_vis]

    def score_text(self, latents: Tensor, t: Tensor, text: LRMText) -> Tensor:
        """r(z_t, c, t) = exp(s) * cos(P_v f_vis(z_t, t, c), f_txt(c)): [B]."""
        uncond = self.encode([""]) if self.vfe_scale != 1.0 else None
        img = self.visual_projection(self.visual_features(latents, t, text, uncond))  # [B, P]
        return self.logit_scale.exp() * F.cosine_similarity(img, text.feature.float(), dim=-1)

    def score(self, latents: Tensor, t: Tensor, cond: Sequence[str]) -> Tensor:
        t = torch.as_tensor(t, device=latents.device).long().expand(latents.shape[0])
        return self.score_text(latents, t, self.encode_unique(cond))


# -------------------------------------------------------------------- checkpoint layout
def save_lrm(lrm: LatentRewardModel, path: str | Path) -> Path:
    """Write the released layout (unet/, text_encoder*/, state_dict.pt) plus tokenizer*/ and lrm_config.json."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    lrm.unet.save_pretrained(out / "unet", safe_serialization=True)
    for i, (enc, tok) in enumerate(zip(lrm.text_encoders, lrm.tokenizers, strict=True)):
        enc.save_pretrained(out / TEXT_ENCODERS[i], safe_serialization=True)
        tok.save_pretrained(out / TOKENIZERS[i])
    state: dict[str, Any] = {"visual_projection": {k: v.detach().cpu() for k, v in lrm.visual_projection.state_dict().items()},
                             "logit_scale": float(lrm.logit_scale.detach())}
    if lrm.text_projection is not None:
        state["text_projection"] = {k: v.detach().cpu() for k, v in lrm.text_projection.state_dict().items()}
    torch.save(state, out / "state_dict.pt")
    (out / "lrm_config.json").write_text(json.dumps(
        {"resolution": lrm.resolution, "vfe_scale": lrm.vfe_scale, "trained": lrm.trained}, indent=2))
    return out


def _load_text_encoder(folder: Path) -> nn.Module:
    import transformers

    arch = json.loads((folder / "config.json").read_text()).get("architectures") or ["CLIPTextModel"]
    return getattr(transformers, arch[0]).from_pretrained(folder)


def load_lrm(path: str | Path, *, base: str | Path | Any = None, resolution: int | None = None,
             vfe_scale: float | None = None) -> LatentRewardModel:
    """Read an LRM folder. Missing text encoders or tokenizers (the released folders have no tokenizers, and
    no text encoders when they were frozen) come from `base`: the diffusers pipeline it was trained from, as
    a folder or as a loaded pipeline object."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    root = Path(path)
    if not (root / "unet").is_dir() or not (root / "state_dict.pt").is_file():
        raise FileNotFoundError(f"{root} is not an LRM folder (needs unet/ and state_dict.pt)")
    extra = json.loads((root / "lrm_config.json").read_text()) if (root / "lrm_config.json").is_file() else {}
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    n_enc = 2 if unet.config.addition_embed_type == "text_time" else 1

    def find(name: str, load: Callable[[Path], Any]) -> Any:
        folder = Path(base) if isinstance(base, str | Path) else None
        for r in (root, folder):
            if r is not None and (r / name).is_dir():
                return load(r / name)
        if base is not None and folder is None and getattr(base, name, None) is not None:
            return copy.deepcopy(getattr(base, name)).float() if name in TEXT_ENCODERS else getattr(base, name)
        raise FileNotFoundError(f"{name}/ is neither in {root} nor in the base pipeline {base}")

    encoders = [find(n, _load_text_encoder) for n in TEXT_ENCODERS[:n_enc]]
    tokenizers = [find(n, CLIPTokenizer.from_pretrained) for n in TOKENIZERS[:n_enc]]
    res = resolution or extra.get("resolution") or int(unet.config.sample_size) * 8  # SD VAEs: factor 8
    lrm = LatentRewardModel(unet, encoders, tokenizers, resolution=res,
                            vfe_scale=vfe_scale or extra.get("vfe_scale", VFE_SCALE), trained=extra.get("trained", True))
    state = torch.load(root / "state_dict.pt", map_location="cpu", weights_only=True)
    lrm.visual_projection.load_state_dict(state["visual_projection"])
    if "text_projection" in state:
        if lrm.text_projection is None:
            raise ValueError(f"{root}: state_dict.pt has a text_projection but the text encoder already projects")
        lrm.text_projection.load_state_dict(state["text_projection"])
    with torch.no_grad():
        lrm.logit_scale.fill_(float(state["logit_scale"]))
    return lrm


def lrm_pair_loss(score_a: Tensor, score_b: Tensor, label_a: Tensor) -> tuple[Tensor, dict[str, float]]:
    """LRM training loss (PickScore-style): softmax over the pair's scores (already exp(s)-scaled logits),
    cross-entropy against soft labels (label_a, 1 - label_a); 1 = a wins, 0.5 = tie.  All [B]."""
    logp = F.log_softmax(torch.stack([score_a, score_b], dim=-1).float(), dim=-1)  # [B, 2]
    target = torch.stack([label_a, 1 - label_a], dim=-1).to(logp)  # [B, 2]
    loss = -(target * logp).sum(-1).mean()
    decided = label_a != 0.5
    acc = ((score_a > score_b) == (label_a > 0.5))[decided].float().mean() if decided.any() else torch.tensor(0.5)
    return loss, {"loss/lrm": loss.item(), "lrm/pair_acc": acc.item()}


# -------------------------------------------------------------------- pixel-space fallback
ImageScorer = Callable[[Tensor, Sequence[str]], Tensor]  # images [B, 3, H, W] in [-1, 1], prompts -> [B]


def contrast_scorer() -> ImageScorer:
    """A stand-in image scorer (per-image pixel std) for tests and plumbing checks."""
    return lambda images, _prompts: images.float().flatten(1).std(dim=1)


def brightness_scorer() -> ImageScorer:
    return lambda images, _prompts: images.float().flatten(1).mean(dim=1)


# name -> "module:factory". Specs name a scorer; they cannot import arbitrary code. Add entries here.
PIXEL_SCORERS: dict[str, str] = {
    "contrast": "trainer.reward:contrast_scorer",
    "brightness": "trainer.reward:brightness_scorer",
}


def pixel_scorer(name: str) -> ImageScorer:
    if name not in PIXEL_SCORERS:
        raise KeyError(f"rl.reward.scorer: unknown pixel scorer {name!r}; known: {sorted(PIXEL_SCORERS)}")
    module, attr = PIXEL_SCORERS[name].split(":")
    return getattr(importlib.import_module(module), attr)()


class PixelReward:
    """score = scorer(decode(x)), where x is the latent itself or, with `denoise`, its x0 estimate at t."""

    def __init__(self, decode: Callable[[Tensor], Tensor], scorer: ImageScorer,
                 denoise: Callable[[Tensor, Tensor, Sequence[str]], Tensor] | None = None) -> None:
        self.decode, self.scorer, self.denoise = decode, scorer, denoise

    @torch.no_grad()
    def score(self, latents: Tensor, t: Tensor, cond: Sequence[str]) -> Tensor:
        t = torch.as_tensor(t, device=latents.device).long().expand(latents.shape[0])
        x = latents if self.denoise is None else self.denoise(latents, t, cond)
        return self.scorer(self.decode(x), list(cond)).float()
