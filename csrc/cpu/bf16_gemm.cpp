#include "cpu/bf16_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (__GNUC__ >= 11 || __clang_major__ >= 12)
#define UNET_FAST_BF16_GEMM 1
#include <immintrin.h>
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define UNET_FAST_BF16_GEMM 0
#endif

namespace unet_fast::cpu {

#if UNET_FAST_BF16_GEMM
namespace {

// Rows of C per microkernel call: 8 x 2 float32 accumulators, 16 independent vdpbf16ps chains.
constexpr int kRows = 8;

// C (rows x 32) = A (rows x 2 * pairs) @ one packed panel.
template <int ROWS>
BF16_TARGET void panel_kernel(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                              int64_t pairs, float* c, int64_t ldc) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * 64 + 32);
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;  // A[r][2p], A[r][2p + 1] as one 32-bit lane, broadcast
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}

template <int ROWS = kRows>
void rows_kernel(int rows, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                 int64_t pairs, float* c, int64_t ldc) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return panel_kernel<ROWS>(a, lda, b, pairs, c, ldc);
    rows_kernel<ROWS - 1>(rows, a, lda, b, pairs, c, ldc);
  }
}

}  // namespace

bool has_bf16_gemm() {
  static const bool has = __builtin_cpu_supports("avx512bf16") != 0;
  return has;
}

void bf16_gemm(int64_t batch, int64_t M, int64_t N, int64_t K, const c10::BFloat16* a,
               const c10::BFloat16* b_packed, float* c) {
  TORCH_CHECK(has_bf16_gemm(), "bf16_gemm: this CPU has no AVX512-BF16");
  TORCH_CHECK(N % kBf16GemmPanel == 0 && K % 2 == 0, "bf16_gemm: N must be a multiple of ",
              kBf16GemmPanel, " and K even, got N=", N, ", K=", K);
  const int64_t panels = N / kBf16GemmPanel, pairs = K / 2;
  at::parallel_for(0, batch * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t problem = job / panels, panel = job % panels;
      const c10::BFloat16* a_p = a + problem * M * K;
      const c10::BFloat16* b_p = b_packed + (problem * panels + panel) * pairs * 64;
      float* c_p = c + problem * M * N + panel * kBf16GemmPanel;
      for (int64_t row = 0; row < M; row += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, M - row));
        rows_kernel(rows, a_p + row * K, K, b_p, pairs, c_p + row * N, N);
      }
    }
  });
}

#else

bool has_bf16_gemm() { return false; }

void bf16_gemm(int64_t, int64_t, int64_t, int64_t, const c10::BFloat16*, const c10::BFloat16*,
               float*) {
  TORCH_CHECK(false, "bf16_gemm: not compiled in this build (needs x86-64 and GCC >= 11)");
}

#endif

}  // namespace unet_fast::cpu
