"""Compiles triton_attention.py's kernels for a GPU architecture on this machine (no GPU needed) and prints
what ptxas reports for each: registers per thread and bytes spilled to local memory.

    PYTHONPATH=. python scripts/triton_registers.py [--arch 90] [--dtype bf16] [--tokens 65] [--head-width 32]

The shape defaults to the default model's attention (65 tokens of head width 32), compiled with the
block and warp count `triton_attention` picks for it (the batch and the head count only change the
grid). A spill means the kernel's tiles do not fit in registers; the launch settings are chosen so
that the model's shape spills nothing on an H100 (sm_90). Pointers are compiled as 16-byte aligned
and integer arguments unspecialised, as a launch at the model's shape compiles them (12 heads and 65
tokens are not multiples of 16).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import triton_attention

FIXED_TYPES = {"heads": "i32", "tokens": "i32", "scale": "fp32", "LSE": "*fp32"}  # whatever the tensors' dtype


def signature(kernel, element: str, options: dict) -> dict:
    """Triton's type for each argument: tensors of `element`, the fixed types above, constants."""
    types = {}
    for name in kernel.arg_names:
        if name in options:
            types[name] = "constexpr"
        elif name in FIXED_TYPES:
            types[name] = FIXED_TYPES[name]
        else:
            types[name] = f"*{element}"
    return types


def ptxas_report(kernel, element: str, options: dict, arch: int) -> str:
    constants = {name: value for name, value in options.items() if name != "num_warps"}
    types = signature(kernel, element, constants)
    # a launch marks each pointer 16-byte aligned (as fresh PyTorch tensors are), so loads may be vectorised
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(types.values()) if kind.startswith("*")}
    compiled = triton.compile(ASTSource(kernel, types, constants, aligned),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": options["num_warps"]})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        result = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", source, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    return "; ".join(line.split("info    :")[-1].strip() for line in result.stderr.splitlines()
                     if "registers" in line or "spill" in line)


def main(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 90 (H100)")
    p.add_argument("--tokens", type=int, default=65, help="tokens per image, the class token included")
    p.add_argument("--head-width", type=int, default=32)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    opts = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.dtype]
    problem = triton_attention.shape_problem(opts.tokens, opts.head_width)
    if problem:
        p.error(f"the Triton attention {problem}")
    qkv = torch.empty(1, opts.tokens, 3 * opts.head_width, dtype=dtype, device="meta")
    _, options = triton_attention._launch_settings(qkv, heads=1)
    print(f"{opts.tokens} tokens of head width {opts.head_width}, {opts.dtype}, sm_{opts.arch}, {options}")
    for kernel in (triton_attention._forward_kernel, triton_attention._backward_kernel):
        print(f"{kernel.__name__}: {ptxas_report(kernel, opts.dtype, options, opts.arch)}")


if __name__ == "__main__":
    sys.exit(main())
