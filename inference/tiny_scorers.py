"""Tiny random-weight scorer folders in the layouts inference/scorers.py loads (for tests and smoke runs).

Like trainer/tiny.py for teachers: the real loaders read these exactly as they read released weights.
- `tiny_clip_dir`: a transformers CLIPModel folder with a locally built CLIP BPE tokenizer and a
  preprocessor_config.json (shortest edge 40, centre crop 32: both code paths run on 32 px inputs);
- `tiny_imagereward_dir`: a BlipForImageTextRetrieval folder, a locally built BERT WordPiece tokenizer and
  imagereward_head.safetensors;
- `tiny_fid_detector`: a TorchScript file with NVlabs' calling convention `net(uint8, return_features=True)`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WORDS = ["a", "an", "the", "of", "handwritten", "digit", "zero", "one", "two", "three", "four", "five", "six",
         "seven", "eight", "nine", "photo", "cat", "dog", "red"]


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_clip_dir(out: str | Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from trainer.tiny import build_clip_tokenizer

    out = Path(out)
    tok = build_clip_tokenizer(out)
    _seeded(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return out


def build_bert_tokenizer(out: Path):  # noqa: ANN201
    from transformers import BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab_file" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 4 reads the file
        tok = BertTokenizer(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    else:  # transformers 5 takes the vocabulary itself
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(out)
    return tok


def tiny_imagereward_dir(out: str | Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from inference.scorers import ImageRewardHead, ImageRewardScorer

    out = Path(out)
    tok = build_bert_tokenizer(out)
    _seeded(seed)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    BlipForImageTextRetrieval(cfg).save_pretrained(out, safe_serialization=True)
    head = ImageRewardHead(32)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / ImageRewardScorer.HEAD))
    (out / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    return out


class TinyDetector(nn.Module):
    """uint8 [B, 3, H, W] -> pooled 4x4 colour means through a fixed random projection, [B, dim]."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(48, dim, generator=gen))

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        feats = F.adaptive_avg_pool2d(x.float() / 127.5 - 1, 4).flatten(1) @ self.proj
        return feats if return_features else feats.sum(-1)


def tiny_fid_detector(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(TinyDetector(seed=seed)), str(path))
    return path
