"""Times F.scaled_dot_product_attention's CUDA kernels against the explicit formula and triton_attention.py.

    PYTHONPATH=. python scripts/attention_backends.py [--batch-size 128]

One layer's attention, forward and backward, on the default model's shape (batch x heads x
65 tokens x head width, bf16), for each fused kernel PyTorch offers that takes the shape and for
`models.self_attention` eager and compiled, and for this repository's Triton kernels (`--attention
triton`, on the warps they pick and on 8); milliseconds per call, timed with CUDA events. Each call
goes, as in the model, from the fused projection's output [N, T, 3 * hidden] to the output
projection's input [N, T, hidden] and back to the gradient of the former: the heads' split and merge,
and the copies they cost each kernel, are part of its time.
"""
import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import models
import triton_attention


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


@contextlib.contextmanager
def launched_on_warps(warps: int):
    """Our kernels launched on `warps` warps instead of the number triton_attention picks (4 at the model's shape:
    two programs per SM; 8 hold the backward in fewer registers per thread but fit one)."""
    picked = triton_attention._launch_settings

    def on_warps(qkv, heads):
        grid, options = picked(qkv, heads)
        return grid, {**options, "num_warps": warps}
    triton_attention._launch_settings = on_warps
    try:
        yield
    finally:
        triton_attention._launch_settings = picked


def attention_shape(batch_size: int, config: models.ViTConfig = models.ViTConfig()):
    return batch_size, config.heads, config.num_patches + 1, config.hidden // config.heads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    opts = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: attention_backends.py times CUDA kernels and found no CUDA GPU; run it on a GPU machine")
    shape = attention_shape(opts.batch_size)
    batch, heads, tokens, width = shape
    qkv = torch.randn(batch, tokens, 3 * heads * width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, tokens, heads * width, device="cuda", dtype=torch.bfloat16)

    def per_head(attend):
        return lambda qkv: models.merge_heads(attend(*models.split_heads(qkv, heads)))

    def forward_backward(attend, setting=contextlib.nullcontext):
        def call():
            with setting():
                torch.autograd.grad(attend(qkv), qkv, grad)  # returned, not accumulated into qkv.grad
        return call

    explicit = per_head(lambda q, k, v: models.self_attention(q, k, v)[0])
    rows = {"explicit formula, eager": forward_backward(explicit),
            "explicit formula, compiled": forward_backward(torch.compile(explicit))}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        rows[f"sdpa {backend.name}"] = forward_backward(per_head(F.scaled_dot_product_attention),
                                                        lambda backend=backend: sdpa_kernel(backend))

    def ours(qkv):
        return triton_attention.attention(qkv, heads)
    rows["triton_attention.py"] = forward_backward(ours)
    rows["triton_attention.py, 8 warps"] = forward_backward(ours, lambda: launched_on_warps(8))
    print(f"attention forward+backward, shape {shape} bf16, {torch.cuda.get_device_name()}")
    for name, call in rows.items():
        try:
            print(f"{name:30s} {time_ms(call):7.3f} ms")
        except RuntimeError as err:
            print(f"{name:30s} not available: {str(err).splitlines()[0][:80]}")


if __name__ == "__main__":
    main()
