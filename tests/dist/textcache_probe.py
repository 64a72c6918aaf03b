"""Run under `accelerate launch --multi_gpu --num_processes 2 tests/dist/textcache_probe.py ROOT`: every rank
builds the text cache of the same 10 captions in chunks of 2 (trainer/textcache.py build_text_cache), then
checks each caption's cached embedding against the teacher's own encoding (tests/dist/test_textcache_dist.py).
"""

from __future__ import annotations

import json
import sys

import torch

from trainer.jobspec import parse_spec
from trainer.models import load_teacher
from trainer.parallel import main_process_first, make_accelerator
from trainer.textcache import build_text_cache

CAPTIONS = [f"a photo of the digit {i}" for i in range(10)]


def main() -> None:
    torch.set_num_threads(1)
    acc = make_accelerator("no")
    cfg = parse_spec({"model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"}})
    with main_process_first(acc, "loading the teacher"):
        teacher = load_teacher(cfg.model)
    cache = build_text_cache(teacher, CAPTIONS, sys.argv[1], batch=2, rank=acc.process_index,
                             world=acc.num_processes)
    worst = 0.0
    for c in ["", *CAPTIONS]:
        got, want = cache.get([c]), teacher.encode([c])
        worst = max(worst, float((got["embeds"] - want.embeds).abs().max()),
                    float((got["pooled"] - want.pooled).abs().max()))
    print(json.dumps({"rank": acc.process_index, "entries": len(cache), "worst": worst}), flush=True)


if __name__ == "__main__":
    main()
