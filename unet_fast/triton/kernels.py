"""Triton kernels: BatchNorm (batch statistics) + ReLU forward and backward, and crop_concat.

Activations are dense in their memory format; programs work on (rows x channels) tiles whose
contiguous axis is the layout's (channels in NHWC, positions in NCHW), so loads coalesce in both
and no per-element division is needed. Statistics are accumulated in float32 per program and
combined across programs in float64 by the launcher.
"""
import os

import triton
import triton.language as tl


@triton.jit
def _tile(part, block_c, C, HW, PIXELS, CHUNK, HW_PARTS, BLOCK_C: tl.constexpr,
          CHANNELS_LAST: tl.constexpr):
    """A program's rows [begin, end), its channels, and how rows and channels map to offsets:
    NHWC rows are pixels (stride C, channels contiguous); NCHW rows are positions in one sample's
    plane (contiguous, channel stride HW). The 1 strides are literal, so loads coalesce."""
    c = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        begin = part * CHUNK
        end = tl.minimum(PIXELS, begin + CHUNK)
        return begin, end, c, 0, C, c
    n = part // HW_PARTS
    begin = (part % HW_PARTS) * CHUNK
    end = tl.minimum(HW, begin + CHUNK)
    return begin, end, c, n * C * HW, 1, c * HW


@triton.jit
def channel_sums_kernel(
    y_ptr,  # (N, C, H, W) activation, dense in its memory format
    dy_ptr,  # gradient, same shape and layout (read only when BACKWARD)
    coef_ptr,  # float32 (3, C), backward only: scale, shift, mean
    partial_ptr,  # float32 (2, C, parts): per-program sums of a and of b
    C, HW, PIXELS,  # channels, pixels per plane, N * HW
    CHUNK, HW_PARTS,  # rows per program; NCHW: programs per plane
    BLOCK_P: tl.constexpr,  # rows per step
    BLOCK_C: tl.constexpr,  # channels per program
    CHANNELS_LAST: tl.constexpr,
    BACKWARD: tl.constexpr,  # forward: a = y - y[first], b = a^2; backward: a = m dy, b = m dy (y - mean)
):
    part = tl.program_id(0)
    parts = tl.num_programs(0)
    begin, end, c, base, row_stride, c_offset = _tile(part, tl.program_id(1), C, HW, PIXELS, CHUNK,
                                                      HW_PARTS, BLOCK_C, CHANNELS_LAST)
    c_ok = c < C
    if BACKWARD:
        scale = tl.load(coef_ptr + c, mask=c_ok, other=0.0)
        shift = tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)
        center = tl.load(coef_ptr + 2 * C + c, mask=c_ok, other=0.0)
    else:  # the first sample's value: a shift that keeps the variance exact at any mean
        center = tl.load(y_ptr + c_offset, mask=c_ok, other=0.0).to(tl.float32)
    acc_a = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(begin, end, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        ok = (rows < end)[:, None] & c_ok[None, :]
        offset = base + rows[:, None] * row_stride + c_offset[None, :]
        y = tl.load(y_ptr + offset, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:
            dy = tl.load(dy_ptr + offset, mask=ok, other=0.0).to(tl.float32)
            a = tl.where(ok & (y * scale[None, :] + shift[None, :] > 0), dy, 0.0)
            acc_a += a
            acc_b += a * (y - center[None, :])
        else:
            d = tl.where(ok, y - center[None, :], 0.0)
            acc_a += d
            acc_b += d * d
    tl.store(partial_ptr + c * parts + part, tl.sum(acc_a, axis=0), mask=c_ok)
    tl.store(partial_ptr + (C + c) * parts + part, tl.sum(acc_b, axis=0), mask=c_ok)


@triton.jit
def channel_map_kernel(
    out_ptr,  # output, same shape and layout as y
    y_ptr,  # (N, C, H, W) activation, dense in its memory format
    dy_ptr,  # gradient, same layout (read only when BACKWARD)
    coef_ptr,  # float32 (5, C): scale, shift, then (backward) gain, slope, offset
    C, HW, PIXELS, CHUNK, HW_PARTS,  # as channel_sums_kernel; CHUNK = BLOCK_P here
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BACKWARD: tl.constexpr,  # forward: relu(y scale + shift); backward: m dy gain + slope y + offset
):
    begin, end, c, base, row_stride, c_offset = _tile(tl.program_id(0), tl.program_id(1), C, HW,
                                                      PIXELS, CHUNK, HW_PARTS, BLOCK_C,
                                                      CHANNELS_LAST)
    c_ok = c < C
    rows = begin + tl.arange(0, BLOCK_P)
    ok = (rows < end)[:, None] & c_ok[None, :]
    offset = base + rows[:, None] * row_stride + c_offset[None, :]
    y = tl.load(y_ptr + offset, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(coef_ptr + c, mask=c_ok, other=0.0)[None, :]
    pre = y * scale + tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)[None, :]
    if BACKWARD:
        dy = tl.load(dy_ptr + offset, mask=ok, other=0.0).to(tl.float32)
        gain = tl.load(coef_ptr + 2 * C + c, mask=c_ok, other=0.0)[None, :]
        slope = tl.load(coef_ptr + 3 * C + c, mask=c_ok, other=0.0)[None, :]
        shift = tl.load(coef_ptr + 4 * C + c, mask=c_ok, other=0.0)[None, :]
        result = tl.where(pre > 0, dy * gain, 0.0) + slope * y + shift
    else:
        result = tl.where((pre > 0) | (pre != pre), pre, 0.0)  # ReLU that keeps NaN, as F.relu
    tl.store(out_ptr + offset, result.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _shifted(src_ptr, n, c, h, w, top, left, height, width, s_n, s_c, s_h, s_w, ok):
    """src[n, c, h - top, w - left], zero outside the source."""
    hs = h - top
    ws = w - left
    inside = ok & (hs >= 0) & (hs < height) & (ws >= 0) & (ws < width)
    return tl.load(src_ptr + n * s_n + c * s_c + hs * s_h + ws * s_w, mask=inside, other=0.0)


@triton.jit
def shifted_concat_kernel(
    out_ptr,  # (N, C, H, W) output, dense in its memory format
    first_ptr, second_ptr,  # sources; `second` holds channels [C_first, C)
    C, H, W, C_first,
    H1, W1, top1, left1, s1_n, s1_c, s1_h, s1_w,  # first source: size, offset in out, strides
    H2, W2, top2, left2, s2_n, s2_c, s2_h, s2_w,  # second source
    BLOCK_R: tl.constexpr,  # NHWC: pixels of one output row; NCHW: rows of one plane
    BLOCK_C: tl.constexpr,  # NHWC: channels per step; NCHW: columns per step
    CHANNELS_LAST: tl.constexpr,
):
    """out[n, c, h, w] = source[n, c', h - top, w - left], zero outside the source. NHWC: a
    program per output row (n, h) and block of its pixels, looping over channels; NCHW: a program
    per plane (n, c) and block of its rows, looping over columns."""
    if CHANNELS_LAST:
        n = tl.program_id(0) // H
        h = tl.program_id(0) % H
        w = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)[None, :]
            ok = (w < W) & (c < C)
            v1 = _shifted(first_ptr, n, c, h, w, top1, left1, H1, W1, s1_n, s1_c, s1_h, s1_w,
                          ok & (c < C_first))
            v2 = _shifted(second_ptr, n, c - C_first, h, w, top2, left2, H2, W2, s2_n, s2_c, s2_h,
                          s2_w, ok & (c >= C_first))
            tl.store(out_ptr + (tl.program_id(0) * W + w) * C + c, tl.where(c < C_first, v1, v2),
                     mask=ok)
    else:
        n = tl.program_id(0) // C
        c = tl.program_id(0) % C
        h = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        for w0 in range(0, W, BLOCK_C):
            w = w0 + tl.arange(0, BLOCK_C)[None, :]
            ok = (h < H) & (w < W)
            if c < C_first:
                v = _shifted(first_ptr, n, c, h, w, top1, left1, H1, W1, s1_n, s1_c, s1_h, s1_w, ok)
            else:
                v = _shifted(second_ptr, n, c - C_first, h, w, top2, left2, H2, W2, s2_n, s2_c,
                             s2_h, s2_w, ok)
            tl.store(out_ptr + (tl.program_id(0) * H + h) * W + w, v, mask=ok)


def _conv_configs():
    """Tile shapes tried on a GPU (Hopper-sized tensor-core tiles). One small tile in the
    interpreter, where timing means nothing, and one GPU tile with UNET_FAST_TRITON_TUNE=0
    (tests: correctness needs no tuning runs)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16})]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
               for m, n, k, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                                     (64, 128, 64, 4, 4), (64, 64, 32, 4, 4),
                                     (128, 128, 32, 8, 4), (64, 32, 32, 4, 3))]
    return configs if os.environ.get("UNET_FAST_TRITON_TUNE", "1") != "0" else configs[3:4]


CONV_MIN_BLOCK_M = min(config.kwargs["BLOCK_M"] for config in _conv_configs())


@triton.autotune(configs=_conv_configs(), key=["C_in", "C_out", "H_out", "W_out", "PROLOGUE",
                                               "RELU"],
                 restore_value=["partial_ptr"])  # tuning runs must leave the zeroed tiles zero
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
    N, H, W, C_in, C_out, H_out, W_out, padding, MAX_TILES,
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
    tiles = MAX_TILES
    tl.store(partial_ptr + pid_m * C_out + offs_n, total, mask=n_ok)
    tl.store(partial_ptr + (tiles + pid_m) * C_out + offs_n, tl.sum(deviation * deviation, axis=0),
             mask=n_ok)
    tl.store(partial_ptr + (2 * tiles + pid_m) * C_out + offs_n, tl.zeros_like(total) + count,
             mask=n_ok)
