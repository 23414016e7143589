// bfloat16 x bfloat16 -> float32 matrix products with AVX512-BF16 (vdpbf16ps), for CPUs that have
// it. ATen's bfloat16 matmul rounds its output to bfloat16; this keeps float32, for callers that
// go on adding products (Winograd's output transform).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace unet_fast::cpu {

// Whether this CPU runs bf16_gemm (AVX512-BF16) and this build compiled it.
bool has_bf16_gemm();

// Columns of a packed B panel; B's column count must be a multiple of it.
constexpr int64_t kBf16GemmPanel = 32;

// For each of `batch` problems b: C_b (M x N, float32, row-major) = A_b (M x K, bfloat16,
// row-major) @ B_b, B_b packed as (N / 32, K / 2, 32, 2): column panels of 32, each holding
// pairs of consecutive rows interleaved (B[2p][n], B[2p + 1][n]). K must be even. Parallel over
// problems and panels.
void bf16_gemm(int64_t batch, int64_t M, int64_t N, int64_t K, const c10::BFloat16* a,
               const c10::BFloat16* b_packed, float* c);

}  // namespace unet_fast::cpu
