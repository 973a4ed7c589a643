"""Attention for short sequences as two Triton kernels: `--attention triton` (needs a CUDA GPU).

    from triton_attention import attention
    out = attention(qkv, heads)     # qkv [N, T, 3 * hidden] -> [N, T, hidden], differentiable

`qkv` is the fused projection's output: each token's q of all heads, then its k, then its v, each
`hidden` = heads x D wide; the result holds each token's heads side by side, softmax(q k^T / sqrt(D)) v
head by head, as the output projection reads it. The kernels read and write exactly these layouts, so
no split into heads, no transposition and no gathering of dq, dk and dv into one gradient is left to
copy around them.

The default model's sequence (65 tokens of width 32) is short enough that one GPU program can hold a
whole (image, head) pair: q, k, v and the 65 x 65 scores fit in registers, so the forward is one pass
with an exact softmax (no running maximum over blocks, as FlashAttention needs for long sequences) and
the backward computes dq, dk and dv in one pass as well, from the log-sum-exp the forward saves.
Tokens are padded to the next power of two (65 -> 128) inside the program; the padding is masked and
never read or written in memory.

Both are torch custom ops with their output shapes registered, so `torch.compile` traces the model
around them without graph breaks and calls them as they are (inside the whole-step CUDA graph their
launches should be captured like any other kernel's: a CUDA test checks it, not yet run on a GPU).
No attention dropout: the model refuses `attention="triton"` with dropout. Up to 128 tokens of head
width 16, 32 or 64; only the default model's shape has been compiled for a GPU and checked for
register spills (scripts/triton_registers.py). fp32 inputs are multiplied in full fp32, not TF32.

`TRITON_INTERPRET=1` (set before Triton is imported) runs the same kernels on CPU tensors through
Triton's interpreter, slowly: that is how the tests check them on machines without a GPU.
"""
import math

import torch
import triton
import triton.language as tl

MAX_TOKENS = 128  # the scores of one (image, head) pair are held in registers: BLOCK x BLOCK floats
HEAD_WIDTHS = (16, 32, 64)  # tl.dot needs power-of-two tiles of at least 16; at 128 the tiles spill (bf16)


def shape_problem(tokens: int, head_width: int):
    """Why the kernels cannot take this many tokens of this head width, or None."""
    if tokens <= MAX_TOKENS and head_width in HEAD_WIDTHS:
        return None
    return (f"takes up to {MAX_TOKENS} tokens of head width {', '.join(map(str, HEAD_WIDTHS))}, not {tokens} tokens "
            f"of width {head_width}: use the sdpa attention")


@triton.jit
def _tile_pointers(base, b, h, rows, cols, tokens, row_width, HEAD_WIDTH: tl.constexpr):
    """Where head h's [BLOCK, HEAD_WIDTH] tile of image b lies in a contiguous [N, T, row_width] tensor whose rows
    hold the heads side by side from `base`. The image's offset is taken in 64 bits: at the model's width qkv
    passes 2**31 elements from about 28,000 images."""
    image_start = base + b.to(tl.int64) * tokens * row_width + h * HEAD_WIDTH
    return image_start + rows[:, None] * row_width + cols[None, :]


@triton.jit
def _tile(base, b, h, rows, cols, tokens, row_width, valid, HEAD_WIDTH: tl.constexpr):
    return tl.load(_tile_pointers(base, b, h, rows, cols, tokens, row_width, HEAD_WIDTH), mask=valid[:, None],
                   other=0.0)


@triton.jit
def _store_tile(base, tile, b, h, rows, cols, tokens, row_width, valid, HEAD_WIDTH: tl.constexpr):
    tl.store(_tile_pointers(base, b, h, rows, cols, tokens, row_width, HEAD_WIDTH),
             tile.to(base.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _this_programs_pair(heads, tokens, BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    """This program's (image, head) pair: its index, image and head, its tiles' rows and columns, the real rows."""
    pair = tl.program_id(0)
    rows = tl.arange(0, BLOCK)
    return pair, pair // heads, pair % heads, rows, tl.arange(0, HEAD_WIDTH), rows < tokens


@triton.jit
def _load_qkv(QKV, b, h, rows, cols, heads, tokens, valid, HEAD_WIDTH: tl.constexpr):
    """The pair's q, k and v tiles: each token's row of QKV holds all heads' q, then their k, then their v."""
    hidden = heads * HEAD_WIDTH
    q = _tile(QKV, b, h, rows, cols, tokens, 3 * hidden, valid, HEAD_WIDTH)
    k = _tile(QKV + hidden, b, h, rows, cols, tokens, 3 * hidden, valid, HEAD_WIDTH)
    v = _tile(QKV + 2 * hidden, b, h, rows, cols, tokens, 3 * hidden, valid, HEAD_WIDTH)
    return q, k, v


# input_precision="ieee": fp32 operands multiply in full fp32, not TF32; 16-bit ones compile the same either way
@triton.jit
def _scores(q, k, cols_valid, scale):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    return tl.where(cols_valid[None, :], s, float("-inf"))


@triton.jit
def _forward_kernel(QKV, OUT, LSE, heads, tokens, scale, BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    pair, b, h, rows, cols, valid = _this_programs_pair(heads, tokens, BLOCK, HEAD_WIDTH)
    q, k, v = _load_qkv(QKV, b, h, rows, cols, heads, tokens, valid, HEAD_WIDTH)
    s = _scores(q, k, valid, scale)
    row_max = tl.max(s, 1)
    p = tl.exp(s - row_max[:, None])
    row_sum = tl.sum(p, 1)
    out = tl.dot((p / row_sum[:, None]).to(v.dtype), v, input_precision="ieee")
    _store_tile(OUT, out, b, h, rows, cols, tokens, heads * HEAD_WIDTH, valid, HEAD_WIDTH)
    tl.store(LSE + pair * tokens + rows, row_max + tl.log(row_sum), mask=valid)  # LSE: [N * heads * T], packed


@triton.jit
def _backward_kernel(QKV, OUT, GRAD_OUT, LSE, GRAD_QKV, heads, tokens, scale,
                     BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    pair, b, h, rows, cols, valid = _this_programs_pair(heads, tokens, BLOCK, HEAD_WIDTH)
    hidden = heads * HEAD_WIDTH
    q, k, v = _load_qkv(QKV, b, h, rows, cols, heads, tokens, valid, HEAD_WIDTH)
    out = _tile(OUT, b, h, rows, cols, tokens, hidden, valid, HEAD_WIDTH)
    grad_out = _tile(GRAD_OUT, b, h, rows, cols, tokens, hidden, valid, HEAD_WIDTH)
    lse = tl.load(LSE + pair * tokens + rows, mask=valid, other=0.0)
    # padded rows: q and grad_out are zero there, so their p never reaches a gradient
    p = tl.exp(_scores(q, k, valid, scale) - lse[:, None])
    grad_v = tl.dot(tl.trans(p.to(grad_out.dtype)), grad_out, input_precision="ieee")
    grad_p = tl.dot(grad_out, tl.trans(v), input_precision="ieee")
    # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(grad_out * out)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    grad_s = (p * (grad_p - delta[:, None]) * scale).to(q.dtype)
    grad_q = tl.dot(grad_s, k, input_precision="ieee")
    grad_k = tl.dot(tl.trans(grad_s), q, input_precision="ieee")
    # written in QKV's layout, which the qkv projection's backward reads as it is
    _store_tile(GRAD_QKV, grad_q, b, h, rows, cols, tokens, 3 * hidden, valid, HEAD_WIDTH)
    _store_tile(GRAD_QKV + hidden, grad_k, b, h, rows, cols, tokens, 3 * hidden, valid, HEAD_WIDTH)
    _store_tile(GRAD_QKV + 2 * hidden, grad_v, b, h, rows, cols, tokens, 3 * hidden, valid, HEAD_WIDTH)


def _launch_settings(qkv, heads: int):
    """Grid, compile-time constants and warps for qkv [N, T, 3 * heads * D], the same for both kernels."""
    batch, tokens, width = qkv.shape
    block = max(16, triton.next_power_of_2(tokens))
    # the backward holds three [block, block] fp32 tiles: at block 128, 8 warps keep them in registers
    return (batch * heads,), dict(BLOCK=block, HEAD_WIDTH=width // (3 * heads), num_warps=max(4, block // 16))


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


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_backward(qkv, out, grad_out, lse, ctx.heads), None


_attention.register_autograd(_backward, setup_context=_save_for_backward)


def attention(qkv, heads: int):
    """softmax(q k^T / sqrt(D)) v head by head, from the fused projection's qkv [N, T, 3 * heads * D] (each token's
    q, k and v side by side) to [N, T, heads * D] (each token's heads side by side); T <= 128."""
    if heads < 1 or qkv.dim() != 3 or qkv.shape[2] % (3 * heads):
        raise ValueError(f"qkv must be [images, tokens, 3 * heads * head width], got {list(qkv.shape)} for {heads} "
                         f"heads")
    problem = shape_problem(qkv.shape[1], qkv.shape[2] // (3 * heads))
    if problem:
        raise ValueError(f"the Triton attention {problem}")
    return _attention(qkv, heads)[0]
