"""One training step (forward, backward, Adam) of the default model at batch 128 on random images, on the CPU, timed
after one warm-up step: fp32 with sdpa (the AVX2 default) against bf16 autocast with the explicit attention formula
(the default where the CPU computes bf16 natively). Run from the repo root:
OMP_NUM_THREADS=2 python results/cpu-bench-avx2-bf16/bf16_step.py"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from models import VisionTransformer, ViTConfig  # noqa: E402

x = torch.randn(128, 3, 32, 32)
y = torch.randint(0, 10, (128,))
for dtype, attention in ((None, "sdpa"), (torch.bfloat16, "math")):
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(attention=attention))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-5)
    for timed in (False, True):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        F.cross_entropy(logits.float(), y, label_smoothing=0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if timed:
            seconds = time.perf_counter() - start
            print(f"{'bf16' if dtype else 'fp32'} {attention}: {seconds:.1f} s per step, {128 / seconds:.1f} images/s",
                  flush=True)
