// Eval mode on the CPU: relu(conv2d(x, w, b)) with BatchNorm already folded into w and b.
//
// Direct: oneDNN runs the convolution (prepacked weights dispatch through the MkldnnCPU key); the
// ReLU follows in place with ATen's relu_, which keeps NaN as F.relu does. oneDNN's ReLU post-op
// would map NaN to 0 and turn a corrupted input into plausible output.
//
// Winograd F(2x2, 3x3) (3x3, padding 1): each 4x4 input tile d becomes V = B^T d B, each weight
// U = G g G^T (once, by winograd_weight), and every 2x2 output tile A^T (U . V) A, where
// the sum over input channels of U . V is 16 matrix products, (tiles x C_in) @ (C_in x C_out):
// 16 multiplications per 2x2 outputs instead of 36. The transforms add and subtract inputs, so
// an Inf turns into NaN where the direct convolution keeps Inf; inputs with NaN, Inf or
// magnitudes past 2^48 (where the transformed products could overflow) take the direct path.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/relu.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/buffer_cache.h"

namespace unet_fast {
namespace {

using Optional = std::optional<at::Tensor>;
using Vec = at::vec::Vectorized<float>;

at::Tensor conv_bias_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const Optional& bias,
                              int64_t padding) {
  const bool onednn = at::globalContext().userEnabledMkldnn() &&
                      (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
  at::Tensor y;
  if (onednn) {
    static auto pointwise =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const Optional&,
                              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                              c10::string_view, c10::List<std::optional<at::Scalar>>,
                              std::optional<c10::string_view>)>();
    y = pointwise.call(x, weight, bias, {padding, padding}, {1, 1}, {1, 1}, 1, "none",
                       c10::List<std::optional<at::Scalar>>(), "");
  } else {
    y = at::convolution(x, weight, bias, {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1);
  }
  // in the input's memory format, as the fake kernel says, whatever oneDNN picks
  return y.relu_().contiguous(x.suggest_memory_format());
}

// Past this magnitude (or at NaN/Inf) an input takes the direct path: below it, products of
// transformed inputs and weights (each at most 4x and 2.25x the original) summed over any
// channel count stay far inside float32's range.
constexpr float kWinogradRange = 0x1p48f;

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const c10::BFloat16* p) {
  Vec v;
  at::vec::load_to_float(p, v);
  return v;
}
inline void store(float* p, const Vec& v) { v.store(p); }
inline void store(c10::BFloat16* p, const Vec& v) {
  at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, Vec::size());
}

// The tile grid of an (N, H, W) image with padding 1: tile t = (n, i, j) covers output rows
// 2i, 2i+1 and columns 2j, 2j+1, and reads input rows 2i-1 .. 2i+2 and columns 2j-1 .. 2j+2.
struct Tiles {
  int64_t N, H, W, rows, cols;
  Tiles(int64_t n, int64_t h, int64_t w) : N(n), H(h), W(w), rows((h + 1) / 2), cols((w + 1) / 2) {}
  int64_t count() const { return N * rows * cols; }
};

// For the tiles first .. first + T - 1: V[k][t - first][c] = (B^T d B)[k], d the 4x4 input tile t
// of channel c (NHWC x, zeros outside), computed in float32 and stored in x's dtype. Returns
// false when an input is NaN, Inf or past kWinogradRange.
template <typename scalar_t>
bool winograd_input(const scalar_t* x, scalar_t* v, const Tiles& g, int64_t C, int64_t first,
                    int64_t T) {
  std::atomic<bool> in_range{true};
  at::parallel_for(first, first + T, 16, [&](int64_t begin, int64_t end) {
    Vec worst(0.f);  // at::vec::maximum keeps NaN
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (g.rows * g.cols), i = t / g.cols % g.rows, j = t % g.cols;
      const scalar_t* at[4][4];
      for (int r = 0; r < 4; ++r) {
        for (int s = 0; s < 4; ++s) {
          const int64_t h = 2 * i - 1 + r, w = 2 * j - 1 + s;
          const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
          at[r][s] = inside ? x + ((n * g.H + h) * g.W + w) * C : nullptr;
        }
      }
      for (int64_t c = 0; c < C; c += Vec::size()) {
        Vec d[4][4], bd[4][4];
        for (int r = 0; r < 4; ++r) {
          for (int s = 0; s < 4; ++s) {
            d[r][s] = at[r][s] ? load(at[r][s] + c) : Vec(0.f);
            worst = at::vec::maximum(worst, d[r][s].abs());
          }
        }
        for (int s = 0; s < 4; ++s) {  // B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3
          bd[0][s] = d[0][s] - d[2][s];
          bd[1][s] = d[1][s] + d[2][s];
          bd[2][s] = d[2][s] - d[1][s];
          bd[3][s] = d[1][s] - d[3][s];
        }
        for (int r = 0; r < 4; ++r) {  // (B^T d) B: the same on columns
          const Vec out[4] = {bd[r][0] - bd[r][2], bd[r][1] + bd[r][2], bd[r][2] - bd[r][1],
                              bd[r][1] - bd[r][3]};
          for (int s = 0; s < 4; ++s) store(v + ((r * 4 + s) * T + t - first) * C + c, out[s]);
        }
      }
    }
    float lanes[Vec::size()];
    worst.store(lanes);
    for (float lane : lanes) {
      if (!(lane <= kWinogradRange)) in_range.store(false, std::memory_order_relaxed);
    }
  });
  return in_range.load();
}

// y = relu(A^T M A + bias) for the tiles first .. first + T - 1, M[k][t - first][c] (float32) the
// products summed over input channels; A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]. The ReLU keeps NaN
// (at::vec::maximum does).
template <typename scalar_t>
void winograd_output(const float* m, const scalar_t* bias, scalar_t* y, const Tiles& g, int64_t C,
                     int64_t first, int64_t T) {
  at::parallel_for(first, first + T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (g.rows * g.cols), i = t / g.cols % g.rows, j = t % g.cols;
      for (int64_t c = 0; c < C; c += Vec::size()) {
        Vec am[2][4];
        for (int s = 0; s < 4; ++s) {
          Vec col[4];
          for (int r = 0; r < 4; ++r)
            col[r] = Vec::loadu(m + ((r * 4 + s) * T + t - first) * C + c);
          am[0][s] = col[0] + col[1] + col[2];
          am[1][s] = col[1] - col[2] - col[3];
        }
        const Vec b = bias ? load(bias + c) : Vec(0.f);
        for (int r = 0; r < 2 && 2 * i + r < g.H; ++r) {
          const Vec out[2] = {am[r][0] + am[r][1] + am[r][2] + b,
                              am[r][1] - am[r][2] - am[r][3] + b};
          for (int s = 0; s < 2 && 2 * j + s < g.W; ++s) {
            store(y + ((n * g.H + 2 * i + r) * g.W + 2 * j + s) * C + c,
                  at::vec::maximum(out[s], Vec(0.f)));
          }
        }
      }
    }
  });
}

// G w G^T, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]], for every (out, in) pair
// of (C_out, C_in, 3, 3) weights, in float32, stored in `dtype` in the layout
// conv_bias_relu_winograd takes: (16, C_in, C_out) in float32, bf16_gemm's packed panels
// (16, C_out / 32, C_in / 2, 32, 2) in bfloat16. Blocks of 32 output channels, input channels
// outer: the loads run along 32 rows of weights, the stores along output channels.
at::Tensor winograd_weight_cpu(const at::Tensor& weight, at::ScalarType dtype) {
  const bool bf16 = dtype == at::kBFloat16;
  TORCH_CHECK(dtype == at::kFloat || bf16, "winograd_weight: dtype must be float32 or bfloat16");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_weight: weight must be (C_out, C_in, 3, 3), got ", weight.sizes());
  const int64_t C_out = weight.size(0), C = weight.size(1), P = cpu::kBf16GemmPanel;
  TORCH_CHECK(!bf16 || (C_out % P == 0 && C % 2 == 0),
              "winograd_weight: bfloat16 needs C_out a multiple of ", P, " and C_in even, got ",
              weight.sizes());
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const auto options = weight.options().dtype(dtype);
  at::Tensor u =
      bf16 ? at::empty({16, C_out / P, C / 2, P, 2}, options) : at::empty({16, C, C_out}, options);
  const float* wp = w.const_data_ptr<float>();
  const auto index = [&](int64_t k, int64_t ci, int64_t co) {
    return bf16 ? (((k * (C_out / P) + co / P) * (C / 2) + ci / 2) * P + co % P) * 2 + ci % 2
                : (k * C + ci) * C_out + co;
  };
  const auto transform = [&](auto* out) {
    using out_t = std::remove_pointer_t<decltype(out)>;
    at::parallel_for(0, (C_out + P - 1) / P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ci = 0; ci < C; ++ci) {
        for (int64_t co = begin * P; co < std::min(end * P, C_out); ++co) {
          const float* g = wp + (co * C + ci) * 9;
          float gg[4][3], u16[4][4];
          for (int j = 0; j < 3; ++j) {  // G g, on rows
            const float half = (g[j] + g[6 + j]) * 0.5f, odd = g[3 + j] * 0.5f;
            gg[0][j] = g[j], gg[1][j] = half + odd, gg[2][j] = half - odd, gg[3][j] = g[6 + j];
          }
          for (int i = 0; i < 4; ++i) {  // (G g) G^T, on columns
            const float half = (gg[i][0] + gg[i][2]) * 0.5f, odd = gg[i][1] * 0.5f;
            u16[i][0] = gg[i][0], u16[i][1] = half + odd, u16[i][2] = half - odd,
            u16[i][3] = gg[i][2];
          }
          for (int k = 0; k < 16; ++k)
            out[index(k, ci, co)] = static_cast<out_t>(u16[k / 4][k % 4]);
        }
      }
    });
  };
  if (bf16) {
    transform(u.data_ptr<c10::BFloat16>());
  } else {
    transform(u.data_ptr<float>());
  }
  return u;
}

// bfloat16 with transformed weights small enough to stay in L2 (narrow layers, whose transformed
// tiles are many): each thread takes its blocks of tiles through all three steps in buffers of
// its own, so nothing goes to memory but x and y. The steps' parallel_for run inline, nested.
bool winograd_bf16_in_blocks(const c10::BFloat16* x, const c10::BFloat16* u,
                             const c10::BFloat16* bias, c10::BFloat16* y, const Tiles& g, int64_t C,
                             int64_t C_out) {
  constexpr int64_t kBlockBytes = int64_t{384} << 10;
  const int64_t block = std::max<int64_t>(8, kBlockBytes / (16 * (2 * C + 4 * C_out)) / 8 * 8);
  std::atomic<bool> in_range{true};
  at::parallel_for(0, (g.count() + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    std::vector<c10::BFloat16> v(16 * block * C);
    std::vector<float> m(16 * block * C_out);
    for (int64_t i = begin; i < end && in_range.load(std::memory_order_relaxed); ++i) {
      const int64_t first = i * block, T = std::min(block, g.count() - first);
      if (!winograd_input(x, v.data(), g, C, first, T)) {
        in_range.store(false, std::memory_order_relaxed);
        return;
      }
      cpu::bf16_gemm(16, T, C_out, C, v.data(), u, m.data());
      winograd_output(m.data(), bias, y, g, C_out, first, T);
    }
  });
  return in_range.load();
}

// float32: the 16 products by ATen's bmm, winograd_weight (16, C_in, C_out). bfloat16: by
// bf16_gemm, which keeps its sums in float32 (rounding them to bfloat16 before the output
// transform would put a layer's error past the bfloat16 rule), winograd_weight packed for it.
at::Tensor conv_bias_relu_winograd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const Optional& bias, const at::Tensor& winograd_weight) {
  const auto& u = winograd_weight;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK((x.scalar_type() == at::kFloat || bf16) && u.scalar_type() == x.scalar_type(),
              "conv_bias_relu_winograd: x and winograd_weight must both be float32 or bfloat16");
  TORCH_CHECK(!bf16 || cpu::has_bf16_gemm(),
              "conv_bias_relu_winograd: bfloat16 needs a CPU with AVX512-BF16");
  const int64_t C = x.size(1), P = cpu::kBf16GemmPanel;
  const int64_t C_out = bf16 ? (u.dim() == 5 ? u.size(1) * P : -1) : u.size(2);
  const bool shaped = x.dim() == 4 && u.size(0) == 16 &&
                      (bf16 ? u.dim() == 5 && u.sizes().slice(2).equals({C / 2, P, 2})
                            : u.dim() == 3 && u.size(1) == C);
  TORCH_CHECK(shaped, "conv_bias_relu_winograd: winograd_weight must be ",
              bf16 ? "(16, C_out / 32, C_in / 2, 32, 2)" : "(16, C_in, C_out)",
              " for x of C_in channels, got ", u.sizes(), " for x ", x.sizes());
  TORCH_CHECK(C % Vec::size() == 0 && C_out % Vec::size() == 0,
              "conv_bias_relu_winograd: channel counts must be multiples of ", Vec::size());
  TORCH_CHECK(!bias || (bias->numel() == C_out && bias->scalar_type() == x.scalar_type()),
              "conv_bias_relu_winograd: bias must have C_out elements of x's dtype");
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const Tiles g(x.size(0), x.size(2), x.size(3));
  // Tiles go through the three steps in chunks whose transformed inputs and products (16 per
  // tile each) take about 8 MiB, so that each step finds the previous one's output in cache;
  // unless the transformed weights, which every chunk reads again, are that large themselves.
  constexpr int64_t kChunkBytes = int64_t{8} << 20, kBlockWeightBytes = int64_t{512} << 10;
  const int64_t tile_bytes = 16 * (C * x.element_size() + C_out * 4);
  const bool chunked = u.numel() * u.element_size() < kChunkBytes;
  const int64_t chunk =
      chunked ? std::min(g.count(), std::max<int64_t>(64, kChunkBytes / tile_bytes)) : g.count();
  const at::Tensor y =
      cpu::empty({g.N, C_out, g.H, g.W}, x.options(), at::MemoryFormat::ChannelsLast);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor uc = u.contiguous();
  const auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (u.numel() * u.element_size() <= kBlockWeightBytes) {
        return winograd_bf16_in_blocks(xc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                                       b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                       y.data_ptr<scalar_t>(), g, C, C_out);
      }
    }
    at::Tensor v = cpu::empty({16 * chunk * C}, x.options());
    at::Tensor m = cpu::empty({16 * chunk * C_out}, x.options().dtype(at::kFloat));
    for (int64_t first = 0; first < g.count(); first += chunk) {
      const int64_t T = std::min(chunk, g.count() - first);
      if (!winograd_input(xc.const_data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), g, C, first, T)) {
        return false;
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        at::Tensor products = m.narrow(0, 0, 16 * T * C_out).view({16, T, C_out});
        at::bmm_out(products, v.narrow(0, 0, 16 * T * C).view({16, T, C}), uc);
      } else {
        cpu::bf16_gemm(16, T, C_out, C, v.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                       m.data_ptr<float>());
      }
      winograd_output(m.const_data_ptr<float>(),
                      b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                      g, C_out, first, T);
    }
    return true;
  };
  if (!(bf16 ? run(c10::BFloat16{}) : run(float{}))) return conv_bias_relu_cpu(x, weight, bias, 1);
  return y.contiguous(x.suggest_memory_format());
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CPU, m) {
  m.impl("conv_bias_relu", &unet_fast::conv_bias_relu_cpu);
  m.impl("conv_bias_relu_winograd", &unet_fast::conv_bias_relu_winograd_cpu);
  m.impl("winograd_weight", &unet_fast::winograd_weight_cpu);
}

// Eval-mode weights prepacked in oneDNN's blocked layout (an MkldnnCPU tensor) dispatch here.
TORCH_LIBRARY_IMPL(unet_fast, MkldnnCPU, m) {
  m.impl("conv_bias_relu", &unet_fast::conv_bias_relu_cpu);
  m.impl("conv_bias_relu_winograd", &unet_fast::conv_bias_relu_winograd_cpu);
}
