// Two loop drivers over an (N, C, HW) activation in NCHW or channels_last (NHWC) layout, with
// per-channel coefficients: an elementwise map and a per-channel two-sum reduction. Vectorised
// over the contiguous axis (HW in NCHW, C in NHWC), parallel with at::parallel_for.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>
#include <vector>

namespace unet_fast::cpu {

using at::vec::Vectorized;

// Loads and stores vectors of the accumulation type (float for float/bfloat16, double for double).
template <typename scalar_t>
struct Io {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static void store(scalar_t* p, const Vec& v) { v.store(p); }
};

template <>
struct Io<c10::BFloat16> {
  using acc_t = float;
  using Vec = Vectorized<float>;
  static Vec load(const c10::BFloat16* p) {
    Vec v;
    at::vec::load_to_float(p, v);
    return v;
  }
  static void store(c10::BFloat16* p, const Vec& v) {
    at::vec::convert_from_float<c10::BFloat16>(v, v).store(p, Vec::size());
  }
};

struct Shape {
  int64_t N, C, HW;
  bool nhwc;
  // Rows of an NHWC tile: about 16K elements (in L2 while its channel blocks are swept), 64 to
  // 256 rows; at most that many terms per vector lane are summed in acc_t before going to double.
  int64_t row_tile() const { return std::clamp<int64_t>(16384 / std::max<int64_t>(C, 1), 64, 256); }
};

// out[i] = op(y[i], dy[i], coefficients of i's channel), with K per-channel coefficient arrays.
// `vop` works on vectors, `sop` on scalars (tails); dy may be null when op ignores it.
// Vectors per channel block in the NHWC loops: one 64-byte cache line of float32 with AVX2.
constexpr int64_t U = 2;

template <typename scalar_t, size_t K, typename VecOp, typename ScalarOp>
void channelwise_map(scalar_t* out, const scalar_t* y, const scalar_t* dy, Shape s,
                     const std::array<const at::opmath_type<scalar_t>*, K>& coef, VecOp vop,
                     ScalarOp sop, int64_t out_channels = 0) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = typename Io<scalar_t>::Vec;
  constexpr int64_t V = Vec::size();
  auto load = [&](const scalar_t* p, int64_t i) { return p ? Io<scalar_t>::load(p + i) : Vec(0); };
  auto at_ = [&](const scalar_t* p, int64_t i) { return p ? static_cast<acc_t>(p[i]) : acc_t(0); };
  // out may be the first s.C channels of a tensor of out_channels channels in the same layout
  const int64_t oc = out_channels ? out_channels : s.C;
  if (!s.nhwc) {
    at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % s.C, base = plane * s.HW;
        // out's planes: those of earlier samples' other channels come before this one
        scalar_t* const o = out + plane / s.C * (oc - s.C) * s.HW;
        std::array<Vec, K> cv;
        std::array<acc_t, K> cs;
        for (size_t k = 0; k < K; ++k) cv[k] = Vec(cs[k] = coef[k][c]);
        int64_t i = 0;
        for (; i + V <= s.HW; i += V) {
          Io<scalar_t>::store(o + base + i, vop(load(y, base + i), load(dy, base + i), cv));
        }
        for (; i < s.HW; ++i) {
          o[base + i] = static_cast<scalar_t>(sop(at_(y, base + i), at_(dy, base + i), cs));
        }
      }
    });
    return;
  }
  // NHWC: tiles of rows (small enough to stay in L2); within a tile, one block of U vectors of
  // channels (a cache line) at a time down the rows, so its coefficients stay in registers.
  const int64_t row_tile = s.row_tile();
  at::parallel_for(0, s.N * s.HW, row_tile, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; tile += row_tile) {
      const int64_t tile_end = std::min(end, tile + row_tile);
      int64_t c = 0;
      for (; c + U * V <= s.C; c += U * V) {
        std::array<std::array<Vec, K>, U> cv;
        for (int64_t u = 0; u < U; ++u)
          for (size_t k = 0; k < K; ++k) cv[u][k] = Vec::loadu(coef[k] + c + u * V);
        for (int64_t row = tile; row < tile_end; ++row) {
          const int64_t i = row * s.C + c, o = row * oc + c;
          for (int64_t u = 0; u < U; ++u) {
            Io<scalar_t>::store(out + o + u * V,
                                vop(load(y, i + u * V), load(dy, i + u * V), cv[u]));
          }
        }
      }
      for (; c < s.C; ++c) {
        std::array<acc_t, K> cs;
        for (size_t k = 0; k < K; ++k) cs[k] = coef[k][c];
        for (int64_t row = tile; row < tile_end; ++row) {
          const int64_t i = row * s.C + c;
          out[row * oc + c] = static_cast<scalar_t>(sop(at_(y, i), at_(dy, i), cs));
        }
      }
    }
  });
}

// For every channel, (sum of a, sum of b) where (a, b) = op(y[i], dy[i], coefficients of i's
// channel). Sums of up to `kBlock` terms per vector lane accumulate in acc_t, then in double, so
// float32 inputs keep about 1e-7 relative accuracy at any N*H*W.
template <typename scalar_t, size_t K, typename VecOp, typename ScalarOp>
std::pair<std::vector<double>, std::vector<double>> channelwise_sums(
    const scalar_t* y, const scalar_t* dy, Shape s,
    const std::array<const at::opmath_type<scalar_t>*, K>& coef, VecOp vop, ScalarOp sop) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = typename Io<scalar_t>::Vec;
  constexpr int64_t V = Vec::size(), kBlock = 64;
  auto load = [&](const scalar_t* p, int64_t i) { return p ? Io<scalar_t>::load(p + i) : Vec(0); };
  auto at_ = [&](const scalar_t* p, int64_t i) { return p ? static_cast<acc_t>(p[i]) : acc_t(0); };
  std::vector<double> sum_a(s.C, 0.0), sum_b(s.C, 0.0);
  if (!s.nhwc) {
    at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        std::array<Vec, K> cv;
        std::array<acc_t, K> cs;
        for (size_t k = 0; k < K; ++k) cv[k] = Vec(cs[k] = coef[k][c]);
        double total_a = 0, total_b = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t base = (n * s.C + c) * s.HW;
          int64_t i = 0;
          while (i + V <= s.HW) {
            Vec acc_a(0), acc_b(0);
            for (int64_t stop = std::min(s.HW - V + 1, i + kBlock * V); i < stop; i += V) {
              auto [a, b] = vop(load(y, base + i), load(dy, base + i), cv);
              acc_a += a;
              acc_b += b;
            }
            total_a += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), acc_a);
            total_b += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), acc_b);
          }
          for (; i < s.HW; ++i) {
            auto [a, b] = sop(at_(y, base + i), at_(dy, base + i), cs);
            total_a += a;
            total_b += b;
          }
        }
        sum_a[c] = total_a;
        sum_b[c] = total_b;
      }
    });
    return {sum_a, sum_b};
  }
  // NHWC: each chunk of rows sums into its own per-channel partials, combined once at the end;
  // within a chunk, tiles of rows are swept one channel block at a time (accumulators in
  // registers).
  const int64_t rows = s.N * s.HW;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, rows));
  std::vector<double> partial(2 * chunks * s.C, 0.0);
  const int64_t row_tile = s.row_tile();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* part_a = partial.data() + 2 * chunk * s.C;
      double* part_b = part_a + s.C;
      const int64_t row_end = rows * (chunk + 1) / chunks;
      for (int64_t tile = rows * chunk / chunks; tile < row_end; tile += row_tile) {
        const int64_t tile_end = std::min(row_end, tile + row_tile);
        int64_t c = 0;
        for (; c + U * V <= s.C; c += U * V) {
          std::array<std::array<Vec, K>, U> cv;
          std::array<Vec, U> acc_a, acc_b;
          for (int64_t u = 0; u < U; ++u) {
            for (size_t k = 0; k < K; ++k) cv[u][k] = Vec::loadu(coef[k] + c + u * V);
            acc_a[u] = acc_b[u] = Vec(0);
          }
          for (int64_t i = tile * s.C + c; i < tile_end * s.C; i += s.C) {
            for (int64_t u = 0; u < U; ++u) {
              auto [a, b] = vop(load(y, i + u * V), load(dy, i + u * V), cv[u]);
              acc_a[u] += a;
              acc_b[u] += b;
            }
          }
          acc_t lanes_a[U * V], lanes_b[U * V];
          for (int64_t u = 0; u < U; ++u) {
            acc_a[u].store(lanes_a + u * V);
            acc_b[u].store(lanes_b + u * V);
          }
          for (int64_t v = 0; v < U * V; ++v) {
            part_a[c + v] += lanes_a[v];
            part_b[c + v] += lanes_b[v];
          }
        }
        for (; c < s.C; ++c) {
          std::array<acc_t, K> cs;
          for (size_t k = 0; k < K; ++k) cs[k] = coef[k][c];
          for (int64_t i = tile * s.C + c; i < tile_end * s.C; i += s.C) {
            auto [a, b] = sop(at_(y, i), at_(dy, i), cs);
            part_a[c] += a;
            part_b[c] += b;
          }
        }
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < s.C; ++c) {
      sum_a[c] += partial[2 * chunk * s.C + c];
      sum_b[c] += partial[(2 * chunk + 1) * s.C + c];
    }
  }
  return {sum_a, sum_b};
}

// (y - k, (y - k)^2) with k a per-channel shift (the first value of the statistics' unit), for
// channelwise_sums as both its vector and scalar op: shifted sums keep the variance exact when
// the mean is large compared to the spread (no cancellation in E[y^2] - E[y]^2).
template <typename scalar_t>
struct ShiftedMoments {
  using A = at::opmath_type<scalar_t>;
  using V = typename Io<scalar_t>::Vec;
  std::pair<V, V> operator()(V v, V, const std::array<V, 1>& k) const {
    const V d = v - k[0];
    return {d, d * d};
  }
  std::pair<A, A> operator()(A v, A, const std::array<A, 1>& k) const {
    const A d = v - k[0];
    return {d, d * d};
  }
};

// Mean, 1/sqrt(var + eps) and the unbiased variance (NaN for a single value) of `units`
// statistics from ShiftedMoments sums over `count` values each.
template <typename A>
void finish_moments(const std::vector<double>& sum, const std::vector<double>& sum_sq,
                    const A* shift, int64_t units, int64_t count, double eps, A* mean, A* invstd,
                    A* unbiased_var) {
  for (int64_t u = 0; u < units; ++u) {
    const double shifted_mean = sum[u] / count;
    const double var = std::max(sum_sq[u] / count - shifted_mean * shifted_mean, 0.0);
    mean[u] = static_cast<A>(shift[u] + shifted_mean);
    invstd[u] = static_cast<A>(1.0 / std::sqrt(var + eps));
    unbiased_var[u] = static_cast<A>(count > 1 ? var * count / (count - 1) : NAN);
  }
}

}  // namespace unet_fast::cpu
