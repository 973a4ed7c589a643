"""Attention for short sequences as two Triton kernels: `--attention triton` (needs a CUDA GPU).

    from triton_attention import attention
    out = attention(q, k, v)        # [N, heads, T, D] each; softmax(q k^T / sqrt(D)) v, differentiable

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
register spills (scripts/triton_registers.py).
The kernels read q, k and v where the fused qkv projection left them (strided views; other layouts
are copied first); fp32 inputs are multiplied in full fp32, not TF32.

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
def _tile_pointers(base, b, h, rows, cols, strides):
    """Where the [BLOCK, HEAD_WIDTH] tile of (image b, head h) lies in a tensor of strides (image, head, token).
    The image's offset is taken in 64 bits: at the model's width it passes 2**31 from about 28,000 images."""
    pair_start = base + b.to(tl.int64) * strides[0] + h * strides[1]
    return pair_start + rows[:, None] * strides[2] + cols[None, :]


@triton.jit
def _tile(base, b, h, rows, cols, strides, valid):
    return tl.load(_tile_pointers(base, b, h, rows, cols, strides), mask=valid[:, None], other=0.0)


@triton.jit
def _store_tile(base, tile, b, h, rows, cols, strides, valid):
    tl.store(_tile_pointers(base, b, h, rows, cols, strides), tile.to(base.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _this_programs_pair(heads, tokens, BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    """This program's (image, head) pair: its index, image and head, its tiles' rows and columns, the real rows."""
    pair = tl.program_id(0)
    rows = tl.arange(0, BLOCK)
    return pair, pair // heads, pair % heads, rows, tl.arange(0, HEAD_WIDTH), rows < tokens


# input_precision="ieee": fp32 operands multiply in full fp32, not TF32; 16-bit ones compile the same either way
@triton.jit
def _scores(q, k, cols_valid, scale):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    return tl.where(cols_valid[None, :], s, float("-inf"))


@triton.jit
def _forward_kernel(Q, K, V, OUT, LSE, qkv_strides, out_strides, heads, tokens, scale,
                    BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    pair, b, h, rows, cols, valid = _this_programs_pair(heads, tokens, BLOCK, HEAD_WIDTH)
    q = _tile(Q, b, h, rows, cols, qkv_strides, valid)
    k = _tile(K, b, h, rows, cols, qkv_strides, valid)
    v = _tile(V, b, h, rows, cols, qkv_strides, valid)
    s = _scores(q, k, valid, scale)
    row_max = tl.max(s, 1)
    p = tl.exp(s - row_max[:, None])
    row_sum = tl.sum(p, 1)
    out = tl.dot((p / row_sum[:, None]).to(v.dtype), v, input_precision="ieee")
    _store_tile(OUT, out, b, h, rows, cols, out_strides, valid)
    tl.store(LSE + pair * tokens + rows, row_max + tl.log(row_sum), mask=valid)  # LSE: [N * heads * T], packed


@triton.jit
def _backward_kernel(Q, K, V, OUT, GRAD_OUT, LSE, GRAD_Q, GRAD_K, GRAD_V, qkv_strides, out_strides,
                     grad_out_strides, grad_strides, heads, tokens, scale,
                     BLOCK: tl.constexpr, HEAD_WIDTH: tl.constexpr):
    pair, b, h, rows, cols, valid = _this_programs_pair(heads, tokens, BLOCK, HEAD_WIDTH)
    q = _tile(Q, b, h, rows, cols, qkv_strides, valid)
    k = _tile(K, b, h, rows, cols, qkv_strides, valid)
    v = _tile(V, b, h, rows, cols, qkv_strides, valid)
    out = _tile(OUT, b, h, rows, cols, out_strides, valid)
    grad_out = _tile(GRAD_OUT, b, h, rows, cols, grad_out_strides, valid)
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
    _store_tile(GRAD_Q, grad_q, b, h, rows, cols, grad_strides, valid)
    _store_tile(GRAD_K, grad_k, b, h, rows, cols, grad_strides, valid)
    _store_tile(GRAD_V, grad_v, b, h, rows, cols, grad_strides, valid)


def _launch_settings(q):
    """Grid, compile-time constants and warps, the same for both kernels."""
    batch, heads, tokens, width = q.shape
    block = max(16, triton.next_power_of_2(tokens))
    # the backward holds three [block, block] fp32 tiles: at block 128, 8 warps keep them in registers
    return (batch * heads,), dict(BLOCK=block, HEAD_WIDTH=width, num_warps=max(4, block // 16))


def _empty_like_out(q):
    """[N, heads, T, D] laid out as [N, T, heads, D], so that the output projection reads it as it is."""
    batch, heads, tokens, width = q.shape
    return q.new_empty(batch, tokens, heads, width).transpose(1, 2)


def _empty_outputs(q):
    """The forward's output and the log-sum-exps it keeps for the backward ([N * heads * T], fp32)."""
    batch, heads, tokens, _ = q.shape
    return _empty_like_out(q), q.new_empty(batch * heads * tokens, dtype=torch.float32)


def _empty_gradients(q):
    return _empty_like_out(q), _empty_like_out(q), _empty_like_out(q)


def _strides(tensor):
    return tensor.stride()[:3]


def _kernel_layout(q, k, v, *others):
    """The kernels step along the last dimension one element at a time, and read q, k and v with one set of
    strides: the fused projection's views already are so, anything else is copied first."""
    if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return (q, k, v, *(t if t.stride(-1) == 1 else t.contiguous() for t in others))


@torch.library.custom_op("vit::short_attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, tokens, width = q.shape
    q, k, v = _kernel_layout(q, k, v)
    out, lse = _empty_outputs(q)
    grid, options = _launch_settings(q)
    _forward_kernel[grid](q, k, v, out, lse, _strides(q), _strides(out), heads, tokens, 1 / math.sqrt(width),
                          **options)
    return out, lse


@_attention.register_fake
def _attention_shapes(q, k, v):
    return _empty_outputs(q)


@torch.library.custom_op("vit::short_attention_backward", mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        grad_out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, tokens, width = q.shape
    q, k, v, out, grad_out = _kernel_layout(q, k, v, out, grad_out)
    grad_q, grad_k, grad_v = _empty_gradients(q)
    grid, options = _launch_settings(q)
    _backward_kernel[grid](q, k, v, out, grad_out, lse, grad_q, grad_k, grad_v, _strides(q), _strides(out),
                           _strides(grad_out), _strides(grad_q), heads, tokens, 1 / math.sqrt(width), **options)
    return grad_q, grad_k, grad_v


@_attention_backward.register_fake
def _attention_backward_shapes(q, k, v, out, grad_out, lse):
    return _empty_gradients(q)


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return _attention_backward(q, k, v, out, grad_out, lse)


_attention.register_autograd(_backward, setup_context=_save_for_backward)


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v for [N, heads, T, D] tensors of one dtype on one device, T <= 128."""
    problem = shape_problem(q.shape[2], q.shape[3])
    if problem:
        raise ValueError(f"the Triton attention {problem}")
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError("q, k and v must have one shape, dtype and device, got "
                         + ", ".join(f"{list(t.shape)} {t.dtype} on {t.device}" for t in (q, k, v)))
    return _attention(q, k, v)[0]
