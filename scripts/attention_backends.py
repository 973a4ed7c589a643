"""Times F.scaled_dot_product_attention's CUDA backends on the default model's attention shape.

    python scripts/attention_backends.py [--batch-size 128]

Forward + backward of one layer's attention (batch x 12 heads x 65 tokens x 32 dims, bf16), per
backend that accepts the shape, against the explicit formula; milliseconds per call, CUDA events.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import models


def time_ms(fn, steps=200, warmup=20):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    opts = p.parse_args()
    shape = (opts.batch_size, 12, 65, 32)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step(attend):
        out = attend(q, k, v)
        out.backward(grad)

    def explicit(q, k, v):
        return models.self_attention(q, k, v)[0]

    compiled = torch.compile(explicit)
    rows = {"math (explicit formula, eager)": lambda: step(explicit),
            "math (explicit formula, compiled)": lambda: step(compiled)}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def run(backend=backend):
            with sdpa_kernel(backend):
                step(F.scaled_dot_product_attention)
        rows[f"sdpa {backend.name}"] = run
    print(f"attention forward+backward, shape {shape} bf16, {torch.cuda.get_device_name()}")
    for name, fn in rows.items():
        try:
            print(f"{name:38s} {time_ms(fn):7.3f} ms")
        except RuntimeError as err:
            print(f"{name:38s} not available: {str(err).splitlines()[0][:80]}")


if __name__ == "__main__":
    main()
