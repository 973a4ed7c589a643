"""Eager vs torch.compile (Inductor, default mode) for the fp32 training step of the default model (sdpa attention),
batch 128 of random images, on the CPU: compile and two steps timed once, then rounds of 3 steps of each, interleaved.
Run from the repo root: OMP_NUM_THREADS=2 python results/cpu-compile-avx2/compile_cpu.py"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from models import VisionTransformer, ViTConfig  # noqa: E402

torch.manual_seed(0)
model = VisionTransformer(ViTConfig(attention="sdpa"))
opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-5, foreach=True)
x = torch.randn(128, 3, 32, 32)
y = torch.randint(0, 10, (128,))


def step(m):
    loss = F.cross_entropy(m(x), y, label_smoothing=0.1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


compiled = torch.compile(model)
t = time.perf_counter()
step(compiled)
step(compiled)
print("compile+2 steps", time.perf_counter() - t, flush=True)
step(model)
for rnd in range(3):
    for name, m in (("eager", model), ("compiled", compiled)):
        t = time.perf_counter()
        for _ in range(3):
            step(m)
        print(rnd, name, f"{3 * 128 / (time.perf_counter() - t):.1f} img/s", flush=True)
