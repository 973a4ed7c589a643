"""fp32 matrix products of the model's shapes (8,320 = 128 images x 65 tokens) on 2 threads: PyTorch (MKL) against
NumPy (OpenBLAS), GFLOP/s after one untimed call, mean of 8.

    OMP_NUM_THREADS=2 python results/cpu-profile-avx2/gemm.py
"""
import time

import numpy as np
import torch


def seconds_per_call(f, n=8):
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n


torch.set_num_threads(2)
print(f"torch {torch.__version__} (BLAS {torch.backends.mkl.is_available() and 'MKL'}), numpy {np.__version__}")
for m, k, n in [(8320, 384, 1152), (8320, 384, 384), (8320, 1152, 384), (384, 8320, 1152)]:
    a, b = torch.randn(m, k), torch.randn(k, n)
    flops = 2 * m * k * n
    torch_s = seconds_per_call(lambda: torch.mm(a, b))
    a_np, b_np = a.numpy(), b.numpy()
    numpy_s = seconds_per_call(lambda: a_np @ b_np)
    print(f"{m} x {k} x {n}: torch {flops / torch_s / 1e9:.0f} GFLOP/s, numpy {flops / numpy_s / 1e9:.0f} GFLOP/s")
