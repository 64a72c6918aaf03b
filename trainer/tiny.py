"""Tiny random-weight SDXL-, SD1.5- and SD3-format pipelines for CPU tests and the ``tiny-*`` presets.

Every component is built from a small config, saved with ``save_pretrained`` and later loaded back with the
stock diffusers pipeline classes, so tests exercise the same loading path as real teachers. Nothing here touches
the network: the CLIP tokenizer is trained locally with a small BPE routine over a built-in word list.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.cache import flashdmd_cache

Family = Literal["sdxl", "sd15", "sd3"]
FAMILIES: tuple[str, ...] = ("sdxl", "sd15", "sd3")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # CLIP's context length; the SD pipelines pad every prompt to it.

# Words the BPE merges are learned from. They cover the demo prompts ("a handwritten digit seven") and common
# caption vocabulary, so real-looking prompts tokenize into a handful of tokens instead of raw bytes.
_WORD_TEXT = """
a an the of and with in on at to from by for is are this that it its photo picture image painting drawing
sketch render illustration portrait close up view high quality detailed realistic style art digital oil
watercolor pencil handwritten digit number zero one two three four five six seven eight nine ten
cat cats dog dogs bird birds horse cow sheep fish mouse rabbit fox bear lion tiger elephant zebra giraffe
monkey duck owl frog snake butterfly person people man woman boy girl child baby face hand eyes hair smile
red green blue yellow orange purple pink brown black white gray grey gold silver colorful dark light bright
car truck bus train bicycle motorcycle boat ship airplane plane street road city town building house home
room kitchen table chair bed sofa window door wall floor garden park tree trees flower flowers grass forest
mountain mountains river lake sea ocean beach sand sky cloud clouds sun moon star stars night day morning
evening sunset sunrise rain snow winter summer spring autumn water fire ice stone rock wood metal glass
paper book books cup plate bowl food pizza cake apple banana bread coffee tea bottle phone computer clock
small large big tiny little old new young beautiful happy sad cute funny sitting standing running walking
flying eating holding playing looking wearing riding next near under over behind front top bottom left
right side center middle background foreground scene landscape field snowy sunny cloudy foggy
hat shirt dress jacket shoes glasses umbrella bag ball toy robot castle bridge tower church market
"""
_WORDS = _WORD_TEXT.split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map: printable bytes map to themselves, the rest to code points
    from 256 on, so every byte string becomes a string of visible symbols the BPE can work on."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself so the
    result is deterministic). Stops early when every word is a single symbol."""
    byte_map = _bytes_to_unicode()
    counts = Counter(words)
    corpus: dict[tuple[str, ...], int] = {}
    for word, n in counts.items():
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        corpus[tuple(symbols)] = n
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in corpus.items():
            for pair in pairwise(symbols):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = n
        corpus = merged
    return merges


@lru_cache(maxsize=4)
def _clip_vocab(vocab_size: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's layout: 256 byte symbols, the same with ``</w>``, merged tokens in merge order, then BOS and EOS
    last, so EOS has the highest id (CLIP's text model finds the pooled token by that)."""
    base = list(_bytes_to_unicode().values())
    tokens = base + [s + END_OF_WORD for s in base]
    merges = _learn_merges(_WORDS, max(0, vocab_size - len(tokens) - 2))
    tokens += [a + b for a, b in merges]
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, tuple(merges)


def build_clip_tokenizer(out_dir: str | Path, vocab_size: int = 1000) -> Any:
    """Write ``vocab.json``/``merges.txt`` in CLIP's format into ``out_dir`` and return a CLIPTokenizer.

    ``vocab_size`` is an upper bound: the built-in word list runs out of pairs to merge at a few hundred merges.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab(vocab_size)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = dict(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=MAX_LENGTH)
    # (pad = EOS as in SD; the pipelines and CLIP's pooling rely on it.)
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4 reads files
        tokenizer = CLIPTokenizer(
            vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"), **special
        )
    else:  # transformers 5 builds its tokenizers.BPE from an in-memory vocab and merge tuples
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **special)
    tokenizer.save_pretrained(out)  # adds the config (model_max_length, specials) so the folder loads as-is
    return tokenizer


def build_t5_tokenizer(out_dir: str | Path) -> Any:
    """A tiny T5 (Unigram) tokenizer over the same word list: whole words, else single characters."""
    from transformers import T5Tokenizer

    chars = sorted(set("".join(_WORDS)) | set("0123456789.,!?-'\":;()"))
    # Unigram picks the segmentation with the best total log-prob: a whole word (-3) beats its characters.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.5) for c in chars]
    vocab += [("\u2581" + w, -3.0) for w in dict.fromkeys(_WORDS)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=256)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _text_encoder(tokenizer: Any, projection: bool, hidden_act: str) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(scaling_factor: float, shift_factor: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    # Two blocks -> vae_scale_factor 2: 32x32 images, 16x16x4 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _unet(cross_attention_dim: int, sdxl: bool) -> Any:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:
        # text_time: 6 time ids (orig size, crop, target size) x 8 dims + the pooled text_encoder_2 projection.
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        **extra,
    )


_SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _t5_encoder(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 layout (gated-gelu) like SD3's T5-XXL. d_model 64 = the transformer's joint_attention_dim.
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def _components(family: str, tok_dir: Path, seed: int, t5: bool) -> dict[str, Any]:
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        PNDMScheduler,
        SD3Transformer2DModel,
    )

    def seeded(offset: int) -> None:
        # A separate seed per component, so changing one component's config leaves the others' weights alone.
        # Only the CPU generator (where everything is built): torch.manual_seed would also reseed CUDA.
        torch.default_generator.manual_seed(seed * 1000 + offset)

    tokenizer = build_clip_tokenizer(tok_dir / "clip")
    seeded(1)
    # text_encoder is CLIP ViT-L (quick_gelu); SD3 also wants its projection for the pooled embedding.
    te1 = _text_encoder(tokenizer, projection=family == "sd3", hidden_act="quick_gelu")
    seeded(2)
    te2 = _text_encoder(tokenizer, projection=True, hidden_act="gelu") if family != "sd15" else None  # bigG
    seeded(3)
    # Each family's real VAE normalisation constants (scaling, shift): SD3 also shifts.
    vae = _vae(*{"sdxl": (0.13025, None), "sd15": (0.18215, None), "sd3": (1.5305, 0.0609)}[family])
    seeded(4)
    if family == "sdxl":
        return dict(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_unet(cross_attention_dim=32 + 32, sdxl=True),  # both encoders' hidden states concatenated
            scheduler=EulerDiscreteScheduler(
                **_SD_BETAS, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1
            ),
            add_watermarker=False,
        )
    if family == "sd15":
        return dict(
            vae=vae,
            text_encoder=te1,
            tokenizer=tokenizer,
            unet=_unet(cross_attention_dim=32, sdxl=False),
            scheduler=PNDMScheduler(**_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # sd3. inner dim = 4 heads x 8 = 32 = caption_projection_dim. joint_attention_dim 64 = T5's width; the
    # pipeline zero-pads the two CLIP hidden states (32 + 32) to it, and feeds zeros of it when T5 is absent.
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 32,
        pos_embed_max_size=16,  # the default 96x96 table would dwarf the rest of this model
    )
    tokenizer_3 = build_t5_tokenizer(tok_dir / "t5") if t5 else None
    seeded(5)
    return dict(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        text_encoder_3=_t5_encoder(tokenizer_3) if t5 else None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=tokenizer_3,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


_PIPELINES = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd15": "StableDiffusionPipeline",
    "sd3": "StableDiffusion3Pipeline",
}


def pipeline_class(family: str) -> Any:
    """The stock diffusers pipeline class for a tiny family."""
    import diffusers

    if family not in _PIPELINES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    return getattr(diffusers, _PIPELINES[family])


def build_tiny_pipeline(family: Family, out_dir: str | Path, seed: int = 0, *, t5: bool = True) -> Path:
    """Build a random-weight ``family`` pipeline (deterministic in ``seed``) and save it to ``out_dir``.

    ``t5`` (sd3 only): include a tiny T5 encoder. Without it model_index.json records text_encoder_3 and
    tokenizer_3 as null, and diffusers' SD3 loader then insists on ``text_encoder_3=None, tokenizer_3=None``
    being passed to ``from_pretrained`` (they are not optional components), as with a real SD3 minus T5.
    """
    out = Path(out_dir)
    cls = pipeline_class(family)
    # fork_rng: building must not disturb the caller's (CPU) RNG stream; CUDA's is never touched.
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        pipe = cls(**_components(family, Path(tmp), seed, t5))
        pipe.save_pretrained(out, safe_serialization=True)
        # Keep CLIP's own vocab.json/merges.txt next to tokenizer.json, so loaders that build CLIP tokenizers
        # from those files (transformers 4's slow CLIPTokenizer) can read the folder too.
        for sub in ("tokenizer", "tokenizer_2"):
            if (out / sub).is_dir():
                for name in ("vocab.json", "merges.txt"):
                    shutil.copyfile(Path(tmp) / "clip" / name, out / sub / name)
    return out


def tiny_pipeline_dir(family: str, cache_root: str | Path | None = None) -> Path:
    """Path of the cached tiny ``family`` pipeline (the ``tiny:<family>`` teacher), built on first use."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    target = flashdmd_cache(cache_root) / "tiny" / family
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename into place: rename is atomic, so concurrent callers see either no
    # folder or a complete one. A loser's rename fails (target not empty) and it drops its own copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        build_tiny_pipeline(family, tmp)  # type: ignore[arg-type]
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
