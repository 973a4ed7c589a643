"""Attention for short sequences as two Triton kernels: `--attention triton` (needs a CUDA GPU).

    from triton_attention import attention
    out = attention(qkv, heads)     # qkv [N, T, 3 * hidden] -> [N, T, hidden], differentiable

`qkv` is the fused projection's output: each token's q of all heads, then its k, then its v, each
`hidden` = heads x D wide; the result holds each token's heads side by side, softmax(q k^T / sqrt(D)) v
head by head, as the output projection reads it. The kernels read and write exactly these layouts, so
no split into heads, no transposition and no gathering of dq, dk and dv into one gradient is left to
copy around them.

The default model's sequence (65 tokens of width 32) is short enough that one GPU program can hold a
whole (image, head) pair in registers: the 64 x 64 scores of the patch tokens and the class token's row
and column. So the forward is one pass with an exact softmax (no running maximum over blocks, as
FlashAttention needs for long sequences) and the backward computes dq, dk and dv in one pass as well,
from the log-sum-exp the forward saves.
The first token (the class token) is kept apart: the 64 patch tokens fill power-of-two tiles exactly
(tl.dot's tiles are powers of two), and the first token's row and column of the scores are computed
as dot products with its vectors. Padding all 65 to 128 would make the products four times larger.
Other token counts pad the tokens after the first to the next power of two inside the program; the
padding is masked and never read or written in memory.

Both are torch custom ops with their output shapes registered, so `torch.compile` traces the model
around them without graph breaks and calls them as they are (inside the whole-step CUDA graph their
launches should be captured like any other kernel's: a CUDA test checks it, not yet run on a GPU).
No attention dropout: the model refuses `attention="triton"` with dropout. Up to 129 tokens of head
width 16, 32 or 64; only the default model's shape has been compiled for a GPU and checked for
register spills (scripts/triton_registers.py). fp32 inputs are multiplied in full fp32, not TF32.

`TRITON_INTERPRET=1` (set before Triton is imported) runs the same kernels on CPU tensors through
Triton's interpreter, slowly: that is how the tests check them on machines without a GPU.
"""
import math

import torch
import triton
import triton.language as tl

MAX_TOKENS = 129  # the first token and 128 others, whose scores are held in registers: BLOCK x BLOCK floats
HEAD_WIDTHS = (16, 32, 64)  # tl.dot needs power-of-two tiles of at least 16; at 128 the tiles spill (bf16)


def shape_problem(tokens: int, head_width: int):
    """Why the kernels cannot take this many tokens of this head width, or None."""
    if 1 <= tokens <= MAX_TOKENS and head_width in HEAD_WIDTHS:
        return None
    return (f"takes up to {MAX_TOKENS} tokens of head width {', '.join(map(str, HEAD_WIDTHS))}, not {tokens} tokens "
            f"of width {head_width}: use the sdpa attention")


# Names: q, k, v, out and grad_out are the [BLOCK, HEAD_WIDTH] tiles of the tokens after the first (the "body");
# q0, k0, v0, out0 and grad_out0 the first token's fp32 vectors; s_b0 are the body's scores against the first
# key, s_0b the first query's against the body's keys, s_00 the first against itself, and so on for p and grad_s.

@triton.jit
def _head_start(base, b, h, tokens, row_width, HEAD_WIDTH: tl.constexpr):
    """Where head h of image b starts in a contiguous [N, T, row_width] tensor whose rows hold the heads side by
    side from `base`. The image's offset is taken in 64 bits: at the model's width qkv passes 2**31 elements
    from about 28,000 images."""
    return base + b.to(tl.int64) * tokens * row_width + h * HEAD_WIDTH


@triton.jit
def _load(start, rows, cols, row_width, valid):
    """(the first token's vector in fp32, the body's tile as stored) of the head that starts at `start`."""
    body = tl.load(start + (rows[:, None] + 1) * row_width + cols[None, :], mask=valid[:, None], other=0.0)
    return tl.load(start + cols).to(tl.float32), body


@triton.jit
def _store(start, first, body, rows, cols, row_width, valid):
    tl.store(start + cols, first.to(start.dtype.element_ty))
    tl.store(start + (rows[:, None] + 1) * row_width + cols[None, :], body.to(start.dtype.element_ty),
             mask=valid[:, None])


@triton.jit
def _this_programs_pair(heads, tokens, BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    """This program's (image, head) pair: its index (64-bit: the log-sum-exps of N * heads * T passes 2**31 from
    about 2.7 million images), image and head, the body's rows and columns, its real rows."""
    pair = tl.program_id(0)
    rows = tl.arange(0, BLOCK)
    return pair.to(tl.int64), pair // heads, pair % heads, rows, tl.arange(0, HEAD_WIDTH), rows < tokens - 1


@triton.jit
def _load_qkv(QKV, b, h, rows, cols, heads, tokens, valid, HEAD_WIDTH: tl.constexpr):
    """q0, k0, v0, q, k, v of the pair: each token's row of QKV holds all heads' q, then their k, then their v."""
    hidden = heads * HEAD_WIDTH
    start = _head_start(QKV, b, h, tokens, 3 * hidden, HEAD_WIDTH)
    q0, q = _load(start, rows, cols, 3 * hidden, valid)
    k0, k = _load(start + hidden, rows, cols, 3 * hidden, valid)
    v0, v = _load(start + 2 * hidden, rows, cols, 3 * hidden, valid)
    return q0, k0, v0, q, k, v


# input_precision="ieee": fp32 operands multiply in full fp32, not TF32; 16-bit ones compile the same either way
@triton.jit
def _product(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _row_dots(tile, vector):
    """Each row of the tile dotted with the vector, in fp32."""
    return tl.sum(tile.to(tl.float32) * vector[None, :], 1)


@triton.jit
def _forward_kernel(QKV, OUT, LSE, heads, tokens, scale, BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    pair, b, h, rows, cols, valid = _this_programs_pair(heads, tokens, BLOCK, HEAD_WIDTH)
    q0, k0, v0, q, k, v = _load_qkv(QKV, b, h, rows, cols, heads, tokens, valid, HEAD_WIDTH)
    # the body's rows: softmax over the body's keys and the first key
    s = tl.where(valid[None, :], _product(q, tl.trans(k)) * scale, float("-inf"))
    s_b0 = _row_dots(q, k0) * scale
    row_max = tl.maximum(tl.max(s, 1), s_b0)
    p, p_b0 = tl.exp(s - row_max[:, None]), tl.exp(s_b0 - row_max)
    row_sum = tl.sum(p, 1) + p_b0
    out = (_product(p.to(v.dtype), v) + p_b0[:, None] * v0[None, :]) / row_sum[:, None]
    # the first token's row
    s_0b = tl.where(valid, _row_dots(k, q0) * scale, float("-inf"))
    s_00 = tl.sum(q0 * k0) * scale
    max0 = tl.maximum(tl.max(s_0b), s_00)
    p_0b, p_00 = tl.exp(s_0b - max0), tl.exp(s_00 - max0)
    sum0 = tl.sum(p_0b) + p_00
    out0 = (tl.sum(p_0b[:, None] * v.to(tl.float32), 0) + p_00 * v0) / sum0
    hidden = heads * HEAD_WIDTH
    _store(_head_start(OUT, b, h, tokens, hidden, HEAD_WIDTH), out0, out, rows, cols, hidden, valid)
    tl.store(LSE + pair * tokens, max0 + tl.log(sum0))  # LSE: [N * heads * T], packed
    tl.store(LSE + pair * tokens + 1 + rows, row_max + tl.log(row_sum), mask=valid)


@triton.jit
def _backward_kernel(QKV, OUT, GRAD_OUT, LSE, GRAD_QKV, heads, tokens, scale,
                     BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    pair, b, h, rows, cols, valid = _this_programs_pair(heads, tokens, BLOCK, HEAD_WIDTH)
    hidden = heads * HEAD_WIDTH
    q0, k0, v0, q, k, v = _load_qkv(QKV, b, h, rows, cols, heads, tokens, valid, HEAD_WIDTH)
    out0, out = _load(_head_start(OUT, b, h, tokens, hidden, HEAD_WIDTH), rows, cols, hidden, valid)
    grad_out0, grad_out = _load(_head_start(GRAD_OUT, b, h, tokens, hidden, HEAD_WIDTH), rows, cols, hidden, valid)
    lse0 = tl.load(LSE + pair * tokens)
    lse = tl.load(LSE + pair * tokens + 1 + rows, mask=valid, other=float("inf"))
    # the probabilities again, from the log-sum-exps; padded rows (lse = inf) and padded keys get p = 0
    p = tl.exp(tl.where(valid[None, :], _product(q, tl.trans(k)) * scale, float("-inf")) - lse[:, None])
    p_b0 = tl.exp(_row_dots(q, k0) * scale - lse)
    p_0b = tl.exp(tl.where(valid, _row_dots(k, q0) * scale, float("-inf")) - lse0)
    p_00 = tl.exp(tl.sum(q0 * k0) * scale - lse0)
    grad_v = _product(tl.trans(p.to(grad_out.dtype)), grad_out) + p_0b[:, None] * grad_out0[None, :]
    grad_v0 = tl.sum(p_b0[:, None] * grad_out.to(tl.float32), 0) + p_00 * grad_out0
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(grad_out * out)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    delta0 = tl.sum(out0 * grad_out0)
    grad_s = (p * (_product(grad_out, tl.trans(v)) - delta[:, None]) * scale).to(q.dtype)
    grad_s_b0 = p_b0 * (_row_dots(grad_out, v0) - delta) * scale
    grad_s_0b = p_0b * (_row_dots(v, grad_out0) - delta0) * scale
    grad_s_00 = p_00 * (tl.sum(grad_out0 * v0) - delta0) * scale
    grad_q = _product(grad_s, k) + grad_s_b0[:, None] * k0[None, :]
    grad_q0 = tl.sum(grad_s_0b[:, None] * k.to(tl.float32), 0) + grad_s_00 * k0
    grad_k = _product(tl.trans(grad_s), q) + grad_s_0b[:, None] * q0[None, :]
    grad_k0 = tl.sum(grad_s_b0[:, None] * q.to(tl.float32), 0) + grad_s_00 * q0
    # written in QKV's layout, which the qkv projection's backward reads as it is
    start = _head_start(GRAD_QKV, b, h, tokens, 3 * hidden, HEAD_WIDTH)
    _store(start, grad_q0, grad_q, rows, cols, 3 * hidden, valid)
    _store(start + hidden, grad_k0, grad_k, rows, cols, 3 * hidden, valid)
    _store(start + 2 * hidden, grad_v0, grad_v, rows, cols, 3 * hidden, valid)


def _launch_settings(qkv, heads: int):
    """Grid, compile-time constants and warps for qkv [N, T, 3 * heads * D], the same for both kernels."""
    batch, tokens, width = qkv.shape
    block = max(16, triton.next_power_of_2(tokens - 1))  # the tokens after the first: 64 at the model's 65
    head_width = width // (3 * heads)
    # the fewest warps whose registers hold the backward's tiles (sm_90, bf16, scripts/triton_registers.py): 4 up
    # to 64 x 32 (233 registers per thread at the model's 64 x 32, 400 bytes spilled on 2 warps; 56 spilled at
    # 64 x 64); 8 above (none spilled at 64 x 64 or 128 x 16, 8 bytes at 128 x 32, 432 at 128 x 64; 16 warps spill
    # more). Measured at 16, 32, 64 and 128 body tokens.
    warps = 4 if block <= 64 and block * head_width <= 64 * 32 else 8
    return (batch * heads,), dict(BLOCK=block, HEAD_WIDTH=head_width, num_warps=warps)


def _empty_outputs(qkv, heads: int):
    """The forward's output [N, T, hidden] and the log-sum-exps it keeps for the backward ([N * heads * T], fp32)."""
    batch, tokens, width = qkv.shape
    return qkv.new_empty(batch, tokens, width // 3), qkv.new_empty(batch * heads * tokens, dtype=torch.float32)


@torch.library.custom_op("vit::short_attention", mutates_args=())
def _attention(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.contiguous()  # the projection's output already is; under torch.compile another layout may come
    out, lse = _empty_outputs(qkv, heads)
    grid, options = _launch_settings(qkv, heads)
    _forward_kernel[grid](qkv, out, lse, heads, qkv.shape[1], 1 / math.sqrt(options["HEAD_WIDTH"]), **options)
    return out, lse


@_attention.register_fake
def _attention_shapes(qkv, heads):
    return _empty_outputs(qkv, heads)


@torch.library.custom_op("vit::short_attention_backward", mutates_args=())
def _attention_backward(qkv: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
                        heads: int) -> torch.Tensor:
    qkv, out, grad_out = qkv.contiguous(), out.contiguous(), grad_out.contiguous()
    grad_qkv = qkv.new_empty(qkv.shape)
    grid, options = _launch_settings(qkv, heads)
    _backward_kernel[grid](qkv, out, grad_out, lse, grad_qkv, heads, qkv.shape[1],
                           1 / math.sqrt(options["HEAD_WIDTH"]), **options)
    return grad_qkv


@_attention_backward.register_fake
def _attention_backward_shapes(qkv, out, grad_out, lse, heads):
    return qkv.new_empty(qkv.shape)


def _save_for_backward(ctx, inputs, output):
    qkv, ctx.heads = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.mark_non_differentiable(output[1])  # the log-sum-exps: kept for the backward, no gradient flows through them
    ctx.set_materialize_grads(False)  # so no zero gradient is allocated for them


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_backward(qkv, out, grad_out, lse, ctx.heads), None


_attention.register_autograd(_backward, setup_context=_save_for_backward)


def attention(qkv, heads: int):
    """softmax(q k^T / sqrt(D)) v head by head, from the fused projection's qkv [N, T, 3 * heads * D] (each token's
    q, k and v side by side) to [N, T, heads * D] (each token's heads side by side); T <= 129."""
    if heads < 1 or qkv.dim() != 3 or qkv.shape[2] % (3 * heads):
        raise ValueError(f"qkv must be [images, tokens, 3 * heads * head width], got {list(qkv.shape)} for {heads} "
                         f"heads")
    problem = shape_problem(qkv.shape[1], qkv.shape[2] // (3 * heads))
    if problem:
        raise ValueError(f"the Triton attention {problem}")
    return _attention(qkv, heads)[0]
