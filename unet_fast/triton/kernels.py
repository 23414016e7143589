"""Triton kernels: BatchNorm (batch statistics) + ReLU forward and backward, and crop_concat.

Activations are viewed as (N, C, HW) with arbitrary strides; CHANNELS_LAST picks the order in
which programs walk elements (memory order, so loads coalesce in both layouts). Statistics are
accumulated in float32 per program and combined across programs in float64 by the launcher.
"""
import triton
import triton.language as tl


@triton.jit
def channel_sums_kernel(
    y_ptr,  # (N, C, HW) activation, strides (stride_n, stride_c, stride_hw)
    dy_ptr,  # gradient of the same shape and strides (read only when BACKWARD)
    coef_ptr,  # float32 (3, C): forward: shift of each channel's sums; backward: scale, shift, mean
    partial_ptr,  # float32 (2, C, CHUNKS): per-program sums of a and of b
    N, C, HW, stride_n, stride_c, stride_hw,
    CHUNK: tl.constexpr,  # elements of one channel per program (a multiple of BLOCK)
    BLOCK: tl.constexpr,
    BACKWARD: tl.constexpr,  # forward: a = y - shift, b = a^2; backward: a = m dy, b = m dy (y - mean)
):
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    count = N * HW
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = idx < count
        offset = (idx // HW) * stride_n + c * stride_c + (idx % HW) * stride_hw
        y = tl.load(y_ptr + offset, mask=inside, other=0.0).to(tl.float32)
        if BACKWARD:
            scale = tl.load(coef_ptr + c)
            shift = tl.load(coef_ptr + C + c)
            mean = tl.load(coef_ptr + 2 * C + c)
            dy = tl.load(dy_ptr + offset, mask=inside, other=0.0).to(tl.float32)
            a = tl.where(inside & (y * scale + shift > 0), dy, 0.0)
            acc_a += a
            acc_b += a * (y - mean)
        else:
            d = tl.where(inside, y - tl.load(coef_ptr + c), 0.0)
            acc_a += d
            acc_b += d * d
    tl.store(partial_ptr + c * chunks + chunk, tl.sum(acc_a, axis=0))
    tl.store(partial_ptr + (C + c) * chunks + chunk, tl.sum(acc_b, axis=0))


@triton.jit
def channel_map_kernel(
    out_ptr,  # output, same shape and strides as y
    y_ptr,  # (N, C, HW) activation, strides (stride_n, stride_c, stride_hw)
    dy_ptr,  # gradient, same strides (read only when BACKWARD)
    coef_ptr,  # float32 (5, C): scale, shift, then (backward) gain, slope, offset
    N, C, HW, stride_n, stride_c, stride_hw,
    BLOCK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # walk elements as (n, hw, c) instead of (n, c, hw)
    BACKWARD: tl.constexpr,  # forward: relu(y scale + shift); backward: m dy gain + slope y + offset
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < N * C * HW
    if CHANNELS_LAST:
        c = idx % C
        hw = (idx // C) % HW
        n = idx // (C * HW)
    else:
        hw = idx % HW
        c = (idx // HW) % C
        n = idx // (C * HW)
    offset = n * stride_n + c * stride_c + hw * stride_hw
    y = tl.load(y_ptr + offset, mask=inside, other=0.0).to(tl.float32)
    pre = y * tl.load(coef_ptr + c, mask=inside, other=0.0) + tl.load(coef_ptr + C + c, mask=inside, other=0.0)
    if BACKWARD:
        dy = tl.load(dy_ptr + offset, mask=inside, other=0.0).to(tl.float32)
        gain = tl.load(coef_ptr + 2 * C + c, mask=inside, other=0.0)
        slope = tl.load(coef_ptr + 3 * C + c, mask=inside, other=0.0)
        shift = tl.load(coef_ptr + 4 * C + c, mask=inside, other=0.0)
        result = tl.where(pre > 0, dy * gain, 0.0) + slope * y + shift
    else:
        result = tl.where((pre > 0) | (pre != pre), pre, 0.0)  # ReLU that keeps NaN, as F.relu
    tl.store(out_ptr + offset, result.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def shifted_concat_kernel(
    out_ptr,  # (N, C, H, W) output, dense in its memory format
    first_ptr, second_ptr,  # sources; `second` holds channels [C_first, C)
    N, C, H, W, C_first,
    H1, W1, top1, left1, s1_n, s1_c, s1_h, s1_w,  # first source: size, offset in out, strides
    H2, W2, top2, left2, s2_n, s2_c, s2_h, s2_w,  # second source
    BLOCK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,  # out is (N, H, W, C) in memory
):
    """out[n, c, h, w] = source[n, c', h - top, w - left], zero outside the source."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < N * C * H * W
    if CHANNELS_LAST:
        c = idx % C
        w = (idx // C) % W
        h = (idx // (C * W)) % H
        n = idx // (C * W * H)
    else:
        w = idx % W
        h = (idx // W) % H
        c = (idx // (W * H)) % C
        n = idx // (W * H * C)
    in_first = c < C_first
    h1, w1 = h - top1, w - left1
    ok1 = inside & in_first & (h1 >= 0) & (h1 < H1) & (w1 >= 0) & (w1 < W1)
    v1 = tl.load(first_ptr + n * s1_n + c * s1_c + h1 * s1_h + w1 * s1_w, mask=ok1, other=0.0)
    c2 = c - C_first
    h2, w2 = h - top2, w - left2
    ok2 = inside & (~in_first) & (h2 >= 0) & (h2 < H2) & (w2 >= 0) & (w2 < W2)
    v2 = tl.load(second_ptr + n * s2_n + c2 * s2_c + h2 * s2_h + w2 * s2_w, mask=ok2, other=0.0)
    tl.store(out_ptr + idx, tl.where(in_first, v1, v2), mask=inside)


@triton.jit
def conv3x3_bn_kernel(
    x_ptr,  # (N, H, W, C_in) input, channels_last, dense
    w_ptr,  # (9, C_in, C_out) weights: tap (kh * 3 + kw), input channel, output channel
    bias_ptr,  # (C_out,) conv bias (read when HAS_BIAS)
    pre_ptr,  # float32 (2, C_in): prologue scale, shift (read when PROLOGUE)
    y_ptr,  # (N, H_out, W_out, C_out) conv output, channels_last, dense
    partial_ptr,  # float32 (2, M_TILES, C_out): this tile's per-channel sum and sum of squared
                  # deviations from the tile's mean (combined across tiles in float64, Chan et al.)
    N, H, W, C_in, C_out, H_out, W_out, padding,
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
                a = tl.where(a_ok, tl.maximum(a * scale[None, :] + shift[None, :], 0.0), 0.0)
            b = tl.load(w_ptr + (tap * C_in + offs_k[:, None]) * C_out + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
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
    tiles = tl.num_programs(0)
    tl.store(partial_ptr + pid_m * C_out + offs_n, total, mask=n_ok)
    tl.store(partial_ptr + (tiles + pid_m) * C_out + offs_n, tl.sum(deviation * deviation, axis=0),
             mask=n_ok)
