"""Implicit-GEMM 3x3 convolution (stride 1) in Triton, channels_last: an optional BatchNorm + ReLU
prologue on its input, and either per-tile statistics or bias + ReLU in its epilogue. Used by the
Triton double conv (training) and the Triton eval convolution."""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

Tensor = torch.Tensor


def _conv_configs():
    """Tile shapes tried on a GPU (Hopper-sized tensor-core tiles). One small tile in the
    interpreter, where timing means nothing, and one GPU tile with UNET_FAST_TRITON_TUNE=0
    (tests: correctness needs no tuning runs)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16})]
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in (
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 128, 32, 8, 4),
            (64, 32, 32, 4, 3),
        )
    ]
    return configs if os.environ.get("UNET_FAST_TRITON_TUNE", "1") != "0" else configs[3:4]


CONV_MIN_BLOCK_M = min(config.kwargs["BLOCK_M"] for config in _conv_configs())


@triton.autotune(
    configs=_conv_configs(),
    key=["C_in", "C_out", "H_out", "W_out", "PROLOGUE", "RELU"],
    restore_value=["partial_ptr"],
)  # tuning runs must leave the zeroed tiles zero
@triton.jit
def conv3x3_bn_kernel(
    x_ptr,  # (N, H, W, C_in) input, channels_last, dense
    w_ptr,  # (9, C_in, C_out) weights: tap (kh * 3 + kw), input channel, output channel
    bias_ptr,  # (C_out,) conv bias (read when HAS_BIAS)
    pre_ptr,  # float32 (2, C_in): prologue scale, shift (read when PROLOGUE)
    y_ptr,  # (N, H_out, W_out, C_out) conv output, channels_last, dense
    partial_ptr,  # float32 (3, tiles, C_out), zeroed: this tile's per-channel sum, sum of squared
    # deviations from the tile's mean, and pixel count (0 for tiles not launched:
    # the autotuned BLOCK_M sets how many are); combined in float64, Chan et al.
    N,
    H,
    W,
    C_in,
    C_out,
    H_out,
    W_out,
    padding,
    MAX_TILES,
    PROLOGUE: tl.constexpr,  # apply relu(x * scale + shift) to the input on the fly
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,  # eval: write relu(conv + bias), no statistics
    BLOCK_M: tl.constexpr,  # output pixels per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels per step
    PRECISION: tl.constexpr,  # "ieee" for float32 accuracy, "tf32" where speed is preferred
):
    """Implicit-GEMM 3x3 convolution (stride 1): y[m, co] = sum over taps and ci of
    act(x[pixel(m) + tap, ci]) w[tap, ci, co], where act is the previous layer's BatchNorm + ReLU
    when PROLOGUE (zero padding stays zero: it pads the activation). The epilogue writes y and the
    per-channel sums of y and y^2 over this program's pixels, so no normalised activation is ever
    stored."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < N * H_out * W_out
    n_ok = offs_n < C_out
    ow = offs_m % W_out
    oh = (offs_m // W_out) % H_out
    on = offs_m // (W_out * H_out)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(9):
        ih = oh + tap // 3 - padding
        iw = ow + tap % 3 - padding
        pixel_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row = ((on * H + ih) * W + iw) * C_in
        for k0 in range(0, C_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C_in
            a_ok = pixel_ok[:, None] & k_ok[None, :]
            a = tl.load(x_ptr + row[:, None] + offs_k[None, :], mask=a_ok, other=0.0).to(tl.float32)
            if PROLOGUE:
                scale = tl.load(pre_ptr + offs_k, mask=k_ok, other=0.0)
                shift = tl.load(pre_ptr + C_in + offs_k, mask=k_ok, other=0.0)
                a = a * scale[None, :] + shift[None, :]
                a = tl.where(a_ok & ((a > 0) | (a != a)), a, 0.0)  # ReLU keeping NaN, as F.relu
            b = tl.load(
                w_ptr + (tap * C_in + offs_k[:, None]) * C_out + offs_n[None, :],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            # bfloat16/float16 operands meet the tensor cores as they are; accumulation is float32
            acc += tl.dot(a.to(b.dtype), b, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.where((acc > 0) | (acc != acc), acc, 0.0)
    ok = m_ok[:, None] & n_ok[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * C_out + offs_n[None, :], y, mask=ok)
    if RELU:
        return
    # statistics of the stored (rounded) values, as a separate BatchNorm would see them
    stored = tl.where(ok, y.to(tl.float32), 0.0)
    count = tl.sum(m_ok.to(tl.float32), axis=0)
    total = tl.sum(stored, axis=0)
    deviation = tl.where(ok, stored - (total / count)[None, :], 0.0)
    tiles = MAX_TILES
    tl.store(partial_ptr + pid_m * C_out + offs_n, total, mask=n_ok)
    tl.store(
        partial_ptr + (tiles + pid_m) * C_out + offs_n,
        tl.sum(deviation * deviation, axis=0),
        mask=n_ok,
    )
    tl.store(
        partial_ptr + (2 * tiles + pid_m) * C_out + offs_n, tl.zeros_like(total) + count, mask=n_ok
    )


def conv3x3(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    padding: int,
    prologue: Optional[Tensor],
    relu: bool,
):
    """Launches the implicit-GEMM convolution: (y channels_last, per-tile partial statistics)."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    h_out, w_out = h + 2 * padding - 2, w + 2 * padding - 2
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in, c_out).contiguous()
    y = x.new_empty((n, c_out, h_out, w_out)).contiguous(memory_format=torch.channels_last)
    max_tiles = triton.cdiv(n * h_out * w_out, CONV_MIN_BLOCK_M)
    partial = x.new_zeros((3, max_tiles, c_out), dtype=torch.float32)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = lambda meta: (
        triton.cdiv(n * h_out * w_out, meta["BLOCK_M"]),  # noqa: E731
        triton.cdiv(c_out, meta["BLOCK_N"]),
    )
    wrap_triton(conv3x3_bn_kernel)[grid](
        x,
        taps,
        bias if bias is not None else taps,
        prologue if prologue is not None else taps,
        y,
        partial,
        n,
        h,
        w,
        c_in,
        c_out,
        h_out,
        w_out,
        padding,
        max_tiles,
        PROLOGUE=prologue is not None,
        HAS_BIAS=bias is not None,
        RELU=relu,
        PRECISION=precision,
    )
    return y, partial


def conv3x3_stats(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    padding: int,
    eps: float,
    prologue: Optional[Tensor] = None,
):
    """The implicit-GEMM convolution: (y channels_last, mean, invstd, unbiased var) with
    `prologue` (2, C_in) = (scale, shift) applying relu(x scale + shift) to x on the fly."""
    y, partial = conv3x3(x, weight, bias, padding, prologue, relu=False)
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    sums, squares, counts = partial.double()
    mean = sums.sum(0) / pixels
    # Chan et al.'s combination; tiles not launched have count 0 and contribute nothing
    m2 = (squares + counts * (sums / counts.clamp_min(1) - mean) ** 2).sum(0)
    var = m2 / pixels
    return y, mean, torch.rsqrt(var + eps), m2 / max(pixels - 1, 1)
