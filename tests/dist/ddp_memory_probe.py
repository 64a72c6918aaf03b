"""Run under `accelerate launch --multi_gpu --num_processes 2`: how much a DDP-wrapped 256 MiB layer adds to
each rank's resident memory by the end of its first backward (tests/dist/test_ddp_memory.py).

The layer is wrapped by trainer.parallel.wrap through trainer.parallel.make_accelerator, the way the
trainer wraps its networks. Prints one JSON line per rank.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from trainer.parallel import make_accelerator, wrap

MiB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    torch.set_num_threads(1)
    acc = make_accelerator("no")
    net = nn.Linear(8192, 8192, bias=False)  # 256 MiB of fp32 weights
    x = torch.randn(2, 8192)
    before = rss()
    wrapped = wrap(acc, net, "ddp")
    wrapped(x).square().mean().backward()
    grown = rss() - before
    row = json.dumps({"rank": acc.process_index, "param_mib": net.weight.numel() * 4 / MiB, "grown_mib": grown / MiB})
    # One write(2) of the whole line: both ranks share the launcher's stdout pipe, and print() may write the
    # text and its newline separately, so two ranks' lines could join into one (writes < PIPE_BUF are atomic).
    os.write(1, (row + "\n").encode())
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
