// The search's hot ops for XLA:CPU, as XLA FFI custom calls: the edge-batched
// depthwise convolution, the training-mode DilConv (ReLU -> depthwise -> 1x1
// with BN's statistics, optionally of an input normalised on its way in) and
// the training-mode 3x3 pools with their BN's statistics, each with its
// backward pass; and the cell mixer's backward pass for the DilConv outputs
// it normalises itself.
//
// Why by hand: XLA:CPU compiles a shift-and-add depthwise conv and its two
// gradients into ~25 fused kernels per convolution (a search cell has 24),
// each a full pass over memory; compiling them is most of the search step's
// compile time and running them a third of its step time. Here each is one
// loop nest over one image at a time, whose data stay in the L2 cache.
//
// Layouts (row-major, the channels innermost so the inner loops vectorise):
//   x      [S, N, H, W, C]       S source states
//   kernel [K, K, D, S, C]       D edges (fan-out) leave each source
//   y, g   [D, S, N, H', W', C]  one output per edge
// Padding is 'same'-style: dilation * (K - 1) / 2 on every side.
//
// Built and loaded by snas_jax/native/__init__.py; tested against lax in
// tests/test_ops.py.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// body(i) for i in [0, n), on the calling thread and XLA's intra-op pool.
// Deadlock-free when every pool thread is busy: the caller claims items too,
// and waits only for items that a helper has claimed (and so is running).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& body) {
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // A helper that starts after the last item was claimed returns at once;
  // `body` (on the caller's stack) is used only for claimed items.
  auto work = [state, n, &body]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

struct Geometry {
  int64_t S, N, H, W, C, K, D, Ho, Wo, stride, dilation, pad;

  static ffi::Error From(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& kernel, int64_t stride,
                         int64_t dilation, Geometry* out) {
    auto xd = x.dimensions();
    auto kd = kernel.dimensions();
    if (xd.size() != 5 || kd.size() != 5 || kd[0] != kd[1] || kd[3] != xd[0] ||
        kd[4] != xd[4] || stride < 1 || dilation < 1 || (dilation * (kd[0] - 1)) % 2) {
      return ffi::Error::InvalidArgument(
          "depthwise: x must be [S,N,H,W,C] and the kernel [K,K,D,S,C] with odd K");
    }
    Geometry& g = *out;
    g = Geometry{xd[0], xd[1], xd[2], xd[3], xd[4], kd[0], kd[2], 0, 0, stride, dilation, 0};
    g.pad = dilation * (g.K - 1) / 2;
    g.Ho = (g.H + 2 * g.pad - dilation * (g.K - 1) - 1) / stride + 1;
    g.Wo = (g.W + 2 * g.pad - dilation * (g.K - 1) - 1) / stride + 1;
    return ffi::Error::Success();
  }
  // Element offsets of one pixel's C channels.
  int64_t X(int64_t s, int64_t n, int64_t h, int64_t w) const {
    return (((s * N + n) * H + h) * W + w) * C;
  }
  int64_t Y(int64_t d, int64_t s, int64_t n, int64_t h, int64_t w) const {
    return ((((d * S + s) * N + n) * Ho + h) * Wo + w) * C;
  }
  int64_t Tap(int64_t i, int64_t j, int64_t d, int64_t s) const {
    return (((i * K + j) * D + d) * S + s) * C;
  }
  // Input row/column read by output position o through tap t, or -1 if padding.
  int64_t In(int64_t o, int64_t t, int64_t size) const {
    int64_t p = o * stride + t * dilation - pad;
    return p >= 0 && p < size ? p : -1;
  }
  // Output row/column that reads input position p through tap t, or -1.
  int64_t Out(int64_t p, int64_t t, int64_t size) const {
    int64_t q = p + pad - t * dilation;
    if (q < 0 || q % stride) return -1;
    q /= stride;
    return q < size ? q : -1;
  }
};

// relu?(x[s, n]) zero-padded by `pad` on every side: [Hp, Wp, C], so the
// loops below read every tap without bounds checks. One copy per image (in
// the cache), and the ReLU applied once rather than per tap and edge.
// Writes rows [H, W·C] (row stride `src_stride`) into out, a [H + 2·pad,
// W + 2·pad, C] image with a zero border of `pad`; only the border is zeroed.
// With `norm` ([mean, rstd] of C channels, C floats apart), relu((x − mean)·rstd):
// a BN the producer left to its consumer (ops.dilconv_raw).
void PadRows(const float* __restrict src, int64_t src_stride, int64_t H, int64_t W, int64_t C,
             int64_t pad, bool relu, float* __restrict out, const float* norm = nullptr,
             int64_t norm_stride = 0) {
  const int64_t Wp = W + 2 * pad, edge = pad * C;
  std::memset(out, 0, sizeof(float) * pad * Wp * C);
  std::memset(out + (H + pad) * Wp * C, 0, sizeof(float) * pad * Wp * C);
  for (int64_t h = 0; h < H; ++h) {
    const float* __restrict row = src + h * src_stride;
    float* __restrict dst = out + (h + pad) * Wp * C;
    std::memset(dst, 0, sizeof(float) * edge);
    std::memset(dst + edge + W * C, 0, sizeof(float) * edge);
    if (norm != nullptr) {
      const float *mean = norm, *rstd = norm + norm_stride;
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c)
          dst[edge + w * C + c] = std::max((row[w * C + c] - mean[c]) * rstd[c], 0.0f);
    } else if (relu) {  // max(NaN, 0) is NaN, as jnp.maximum
      for (int64_t c = 0; c < W * C; ++c) dst[edge + c] = std::max(row[c], 0.0f);
    } else {
      std::memcpy(dst + edge, row, sizeof(float) * W * C);
    }
  }
}

// norm: [2, S, C] (mean, rstd per source) or null; see PadRows.
void PadImage(const Geometry& g, const float* __restrict x, int64_t s, int64_t n, bool relu,
              std::vector<float>& out, const float* norm = nullptr) {
  out.resize((g.H + 2 * g.pad) * (g.W + 2 * g.pad) * g.C);
  PadRows(x + g.X(s, n, 0, 0), g.W * g.C, g.H, g.W, g.C, g.pad, relu, out.data(),
          norm == nullptr ? nullptr : norm + s * g.C, g.S * g.C);
}

// Channel blocks: GCC/Clang vector types of 16 and 8 floats (one AVX-512 /
// AVX register; other targets split them), then single floats. Every loop
// below is written once for a block type T and runs on all three.
typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));
// The widest block: 16 lanes only where they are one register (AVX-512).
// Elsewhere (AVX2: 16 registers of 8 lanes) a V16 is two registers, and the
// loops' U accumulators of 16 lanes spilled to the stack: the paper's search
// step ran 3x slower on an AVX2 machine (10.0 s vs 3.1 s with V8 blocks).
#ifdef __AVX512F__
typedef V16 VW;
#else
typedef V8 VW;
#endif
constexpr int kWide = sizeof(VW) / sizeof(float);

// D images [H', W', C] of one source image n, d_stride floats apart: in the
// global [D, S, N, H', W', C] layout, or one thread's buffer.
struct Images {
  float* base;
  int64_t d_stride;
  float* At(int64_t d, int64_t offset) const { return base + d * d_stride + offset; }
  static Images Global(const Geometry& g, const float* y, int64_t s, int64_t n) {
    return {const_cast<float*>(y) + g.Y(0, s, n, 0, 0), g.S * g.N * g.Ho * g.Wo * g.C};
  }
  static Images Local(const Geometry& g, std::vector<float>& buf, int64_t channels) {
    buf.resize(g.D * g.Ho * g.Wo * channels);
    return {buf.data(), g.Ho * g.Wo * channels};
  }
};

template <typename T>
inline T Load(const float* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // an unaligned vector load
  return v;
}
template <typename T>
inline void Store(float* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// f(T{}, c0) for the blocks [c0, c0 + lanes of T) that tile [0, C).
template <typename F>
void ForBlocks(int64_t C, F f) {
  int64_t c0 = 0;
  for (; c0 + kWide <= C; c0 += kWide) f(VW{}, c0);
  if constexpr (kWide > 8) {
    if (c0 + 8 <= C) f(V8{}, c0), c0 += 8;
  }
  for (; c0 < C; ++c0) f(0.0f, c0);
}

template <int V>
using Int = std::integral_constant<int, V>;

// Runs pixels(Int<U>{}, ow) over [0, n) in groups of U = 8, then 4, then 1:
// eight independent sums keep both FMA units busy (latency 4 x 2 ports).
template <typename F>
inline void ForPixels(int64_t n, F pixels) {
  int64_t o = 0;
  for (; o + 8 <= n; o += 8) pixels(Int<8>{}, o);
  for (; o + 4 <= n; o += 4) pixels(Int<4>{}, o);
  for (; o < n; ++o) pixels(Int<1>{}, o);
}

// f(Int<K>, Int<dilation>, Int<stride>, Int<C>) if the window and the channel
// count are ones the search uses (K 3 or 5; dilation and stride 1 or 2; C 8,
// 16, 32 or 64, in blocks of VW, and C 8 in one V8 where VW is wider): loops with
// constant trip counts and offsets, fully unrolled, every address a register
// plus a constant. False otherwise (the generic loops run instead).
template <typename T, typename F>
bool WithFixedShape(const Geometry& g, F f) {
  auto by_channels = [&](auto k, auto dil, auto stride) {
    if constexpr (std::is_same_v<T, VW>) {
      if constexpr (kWide == 8) {
        if (g.C == 8) return f(k, dil, stride, Int<8>{}), true;
      }
      if (g.C == 16) return f(k, dil, stride, Int<16>{}), true;
      if (g.C == 32) return f(k, dil, stride, Int<32>{}), true;
      if (g.C == 64) return f(k, dil, stride, Int<64>{}), true;
    } else if constexpr (std::is_same_v<T, V8>) {
      if (g.C == 8) return f(k, dil, stride, Int<8>{}), true;
    }
    return false;
  };
  auto by_stride = [&](auto k, auto dil) {
    if (g.stride == 1) return by_channels(k, dil, Int<1>{});
    if (g.stride == 2) return by_channels(k, dil, Int<2>{});
    return false;
  };
  auto by_dilation = [&](auto k) {
    if (g.dilation == 1) return by_stride(k, Int<1>{});
    if (g.dilation == 2) return by_stride(k, Int<2>{});
    return false;
  };
  if (g.K == 3) return by_dilation(Int<3>{});
  if (g.K == 5) return by_dilation(Int<5>{});
  return false;
}

// ForwardBlock with the window's shape known at compile time.
template <typename T, int K, int DIL, int STRIDE, int C>
void ForwardFixed(const Geometry& g, const float* __restrict xp, const float* __restrict k,
                  Images y, int64_t s, int64_t c0) {
  const int64_t Wp = g.W + 2 * g.pad;
  for (int64_t d = 0; d < g.D; ++d) {
    T kv[K * K];
    for (int t = 0; t < K * K; ++t) kv[t] = Load<T>(k + g.Tap(t / K, t % K, d, s) + c0);
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const float* __restrict row = xp + oh * STRIDE * Wp * C + c0;
      float* __restrict out = y.At(d, oh * g.Wo * C) + c0;
      ForPixels(g.Wo, [&](auto u, int64_t ow) {
        constexpr int U = decltype(u)::value;
        T a[U] = {};
#pragma GCC unroll 5
        for (int i = 0; i < K; ++i) {
#pragma GCC unroll 5
          for (int j = 0; j < K; ++j) {
            const float* __restrict xv = row + (i * DIL * Wp + ow * STRIDE + j * DIL) * C;
#pragma GCC unroll 8
            for (int p = 0; p < U; ++p) a[p] += Load<T>(xv + p * STRIDE * C) * kv[i * K + j];
          }
        }
#pragma GCC unroll 8
        for (int p = 0; p < U; ++p) Store(out + (ow + p) * C, a[p]);
      });
    }
  }
}

// Channels [c0, c0 + lanes) of y[d, s, n] from the padded image xp.
template <typename T>
void ForwardBlock(const Geometry& g, const float* __restrict xp, const float* __restrict k,
                  Images y, int64_t s, int64_t c0) {
  if (WithFixedShape<T>(g, [&](auto K, auto dil, auto stride, auto C) {
        ForwardFixed<T, K, dil, stride, C>(g, xp, k, y, s, c0);
      })) {
    return;
  }
  const int64_t Wp = g.W + 2 * g.pad, C = g.C;
  for (int64_t d = 0; d < g.D; ++d) {
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const float* __restrict row = xp + oh * g.stride * Wp * C + c0;
      float* __restrict out = y.At(d, oh * g.Wo * g.C) + c0;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        T a{};
        for (int64_t i = 0; i < g.K; ++i)
          for (int64_t j = 0; j < g.K; ++j)
            a += Load<T>(row + (i * g.dilation * Wp + j * g.dilation + ow * g.stride) * C) *
                 Load<T>(k + g.Tap(i, j, d, s) + c0);
        Store(out + ow * C, a);
      }
    }
  }
}

// part[tap, d, c0:] += Σ over (H', W') of the padded image's view for the
// tap times g[d, s, n]: the kernel gradient of one image. A row of K taps at
// a time, so each load of g feeds K products, for U pixels at once: U·K
// independent sums in registers (K, U compile-time constants).
// DIL, STRIDE, CC > 0: the dilation, stride and channel count as compile-time
// constants (WithFixedShape); 0: read from g.
template <typename T, int K, int DIL = 0, int STRIDE = 0, int CC = 0>
void KernelGradRows(const Geometry& g, const float* __restrict xp, Images gy,
                    float* __restrict part, int64_t c0) {
  constexpr int U = K <= 3 ? 4 : 2;
  const int64_t dil = DIL > 0 ? DIL : g.dilation, stride = STRIDE > 0 ? STRIDE : g.stride;
  const int64_t C = CC > 0 ? CC : g.C;
  const int64_t Wp = g.W + 2 * g.pad, step = stride * C, jstep = dil * C;
  for (int64_t d = 0; d < g.D; ++d) {
    for (int64_t i = 0; i < K; ++i) {
      T a[U][K] = {};
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const float* __restrict xv = xp + (oh * stride + i * dil) * Wp * C + c0;
        const float* __restrict gv = gy.At(d, oh * g.Wo * C) + c0;
        int64_t ow = 0;
        for (; ow + U <= g.Wo; ow += U) {
#pragma GCC unroll 4
          for (int p = 0; p < U; ++p) {
            const T gp = Load<T>(gv + (ow + p) * C);
            const float* x0 = xv + (ow + p) * step;
#pragma GCC unroll 5
            for (int j = 0; j < K; ++j) a[p][j] += Load<T>(x0 + j * jstep) * gp;
          }
        }
        for (; ow < g.Wo; ++ow) {
          const T g0 = Load<T>(gv + ow * C);
#pragma GCC unroll 5
          for (int j = 0; j < K; ++j) a[0][j] += Load<T>(xv + ow * step + j * jstep) * g0;
        }
      }
      for (int j = 0; j < K; ++j) {
        T sum = a[0][j];
        for (int p = 1; p < U; ++p) sum += a[p][j];
        float* pv = part + ((i * K + j) * g.D + d) * C + c0;
        Store(pv, Load<T>(pv) + sum);
      }
    }
  }
}

// KernelGradRows for a fixed 3x3 window: all 9 taps in one pass over g, one
// pixel at a time (a row of taps per pass read g three times and ran 1.45x
// slower; for 5x5, 2 or 3 rows per pass were no faster than one row of 2
// pixels, so 5x5 keeps KernelGradRows).
template <typename T, int DIL, int STRIDE, int C>
void KernelGrad3x3(const Geometry& g, const float* __restrict xp, Images gy,
                   float* __restrict part, int64_t c0) {
  const int64_t Wp = g.W + 2 * g.pad;
  for (int64_t d = 0; d < g.D; ++d) {
    T a[3][3] = {};
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const float* __restrict xv = xp + oh * STRIDE * Wp * C + c0;
      const float* __restrict gv = gy.At(d, oh * g.Wo * C) + c0;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const T gp = Load<T>(gv + ow * C);
        const float* x0 = xv + ow * STRIDE * C;
#pragma GCC unroll 3
        for (int i = 0; i < 3; ++i)
#pragma GCC unroll 3
          for (int j = 0; j < 3; ++j) a[i][j] += Load<T>(x0 + (i * DIL * Wp + j * DIL) * C) * gp;
      }
    }
    for (int t = 0; t < 9; ++t) {
      float* pv = part + (t * g.D + d) * C + c0;
      Store(pv, Load<T>(pv) + a[t / 3][t % 3]);
    }
  }
}

template <typename T>
void KernelGradBlock(const Geometry& g, const float* __restrict xp, Images gy,
                     float* __restrict part, int64_t c0) {
  if (WithFixedShape<T>(g, [&](auto K, auto dil, auto stride, auto C) {
        if constexpr (decltype(K)::value == 3) {
          KernelGrad3x3<T, dil, stride, C>(g, xp, gy, part, c0);
        } else {
          KernelGradRows<T, K, dil, stride, C>(g, xp, gy, part, c0);
        }
      })) {
    return;
  }
  if (g.K == 3) return KernelGradRows<T, 3>(g, xp, gy, part, c0);
  if (g.K == 5) return KernelGradRows<T, 5>(g, xp, gy, part, c0);
  const int64_t Wp = g.W + 2 * g.pad, C = g.C, step = g.stride * C;
  for (int64_t d = 0; d < g.D; ++d) {  // any other K: one tap at a time
    for (int64_t i = 0; i < g.K; ++i) {
      for (int64_t j = 0; j < g.K; ++j) {
        T a{};
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const float* __restrict xv = xp + ((oh * g.stride + i * g.dilation) * Wp + j * g.dilation) * C + c0;
          const float* __restrict gv = gy.At(d, oh * g.Wo * C) + c0;
          for (int64_t ow = 0; ow < g.Wo; ++ow) a += Load<T>(xv + ow * step) * Load<T>(gv + ow * C);
        }
        float* pv = part + ((i * g.K + j) * g.D + d) * C + c0;
        Store(pv, Load<T>(pv) + a);
      }
    }
  }
}

// The D·K² kernel vectors of source s, channels [c0, c0 + lanes), contiguous
// (one thread's buffer): in the loops each tap is a constant offset (through
// g.Tap, each address cost integer multiplies: the input gradient ran 2.5x
// slower).
template <typename T, int K>
const T* PackKernel(const Geometry& g, const float* k, int64_t s, int64_t c0) {
  static thread_local std::vector<T> kbuf;
  kbuf.resize(g.D * K * K);
  for (int64_t d = 0; d < g.D; ++d)
    for (int t = 0; t < K * K; ++t) kbuf[d * K * K + t] = Load<T>(k + g.Tap(t / K, t % K, d, s) + c0);
  return kbuf.data();
}

// Stride 1: dx[h, w] = Σ_d Σ_taps gp_d[h + 2·pad − i·dil, w + 2·pad − j·dil]·k[i, j, d]
// over the D cotangent images padded by `pad` (gp), a gather like the
// forward pass; zero where the ReLU clipped x.
template <typename T, int K, int DIL, int C>
void InputGradFixed(const Geometry& g, const float* __restrict gp, const float* __restrict x,
                    const float* __restrict k, float* __restrict dx, int64_t s, int64_t n,
                    int64_t c0, bool relu) {
  const int64_t Wp = g.W + 2 * g.pad, Hp = g.H + 2 * g.pad, reach = 2 * g.pad;
  const T* kbuf = PackKernel<T, K>(g, k, s, c0);
  // One edge d at a time, summed in dx: the K rows of one padded cotangent
  // image that a row of pixels reads stay in L1 (all D's did not).
  for (int64_t d = 0; d < g.D; ++d) {
    const T* __restrict kd = kbuf + d * K * K;
    const bool first = d == 0, last = d == g.D - 1;
    for (int64_t h = 0; h < g.H; ++h) {
      const float* __restrict row = gp + ((d * Hp + h + reach) * Wp + reach) * C + c0;
      float* __restrict out = dx + g.X(s, n, h, 0) + c0;
      ForPixels(g.W, [&](auto u, int64_t w) {
        constexpr int U = decltype(u)::value;
        T a[U];
#pragma GCC unroll 8
        for (int p = 0; p < U; ++p) a[p] = first ? T{} : Load<T>(out + (w + p) * C);
#pragma GCC unroll 5
        for (int i = 0; i < K; ++i) {
#pragma GCC unroll 5
          for (int j = 0; j < K; ++j) {
            const float* __restrict gv = row + (w - i * DIL * Wp - j * DIL) * C;
            const T kv = kd[i * K + j];
#pragma GCC unroll 8
            for (int p = 0; p < U; ++p) a[p] += Load<T>(gv + p * C) * kv;
          }
        }
#pragma GCC unroll 8
        for (int p = 0; p < U; ++p) {
          T v = a[p];
          if (relu && last) v = Load<T>(x + g.X(s, n, h, w + p) + c0) > T{} ? v : T{};  // select
          Store(out + (w + p) * C, v);
        }
      });
    }
  }
}

// Stride 2: dx[h, w] = Σ_d Σ_taps g_d[(h + pad − i·dil) / 2, (w + pad − j·dil) / 2]
// · k[i, j, d] over the taps whose offsets are even: for each parity class
// (PH, PW) of (h, w) a fixed subset of the taps (a sub-pixel convolution),
// gathered from the D cotangent images padded by `pad` (gp). (Scattered,
// the first version, ran at 6 GFLOP/s: every tap a read-modify-write.)
template <typename T, int K, int DIL, int C>
void InputGradStride2Fixed(const Geometry& g, const float* __restrict gp, const float* __restrict x,
                           const float* __restrict k, float* __restrict dx, int64_t s, int64_t n,
                           int64_t c0, bool relu) {
  constexpr int PAD = DIL * (K - 1) / 2;
  const int64_t Hq = g.Ho + 2 * PAD, Wq = g.Wo + 2 * PAD;
  const T* kbuf = PackKernel<T, K>(g, k, s, c0);
  for (int64_t d = 0; d < g.D; ++d) {
    const T* __restrict kd = kbuf + d * K * K;
    const bool first = d == 0, last = d == g.D - 1;
    auto parity = [&](auto ph, auto pw) {
      constexpr int PH = decltype(ph)::value, PW = decltype(pw)::value;
      for (int64_t mh = 0; 2 * mh + PH < g.H; ++mh) {
        const float* __restrict row = gp + ((d * Hq + mh + PAD) * Wq + PAD) * C + c0;
        float* __restrict out = dx + g.X(s, n, 2 * mh + PH, 0) + c0;
        const float* __restrict xr = x + g.X(s, n, 2 * mh + PH, 0) + c0;
        ForPixels((g.W - PW + 1) / 2, [&](auto u, int64_t mw) {
          constexpr int U = decltype(u)::value;
          T a[U];
#pragma GCC unroll 8
          for (int p = 0; p < U; ++p) a[p] = first ? T{} : Load<T>(out + (2 * (mw + p) + PW) * C);
#pragma GCC unroll 5
          for (int i = 0; i < K; ++i) {
            if ((PH + PAD - i * DIL) % 2 != 0) continue;  // folded: i, PH, PAD are constants
            const int oi = (PH + PAD - i * DIL) / 2;
#pragma GCC unroll 5
            for (int j = 0; j < K; ++j) {
              if ((PW + PAD - j * DIL) % 2 != 0) continue;
              const float* __restrict gv = row + (oi * Wq + mw + (PW + PAD - j * DIL) / 2) * C;
              const T kv = kd[i * K + j];
#pragma GCC unroll 8
              for (int p = 0; p < U; ++p) a[p] += Load<T>(gv + p * C) * kv;
            }
          }
#pragma GCC unroll 8
          for (int p = 0; p < U; ++p) {
            const int64_t at = (2 * (mw + p) + PW) * C;
            T v = a[p];
            if (relu && last) v = Load<T>(xr + at) > T{} ? v : T{};  // elementwise select
            Store(out + at, v);
          }
        });
      }
    };
    parity(Int<0>{}, Int<0>{});
    parity(Int<0>{}, Int<1>{});
    parity(Int<1>{}, Int<0>{});
    parity(Int<1>{}, Int<1>{});
  }
}

template <typename T>
void InputGradBlock(const Geometry& g, const float* __restrict gp, const float* __restrict x,
                    const float* __restrict k, float* __restrict dx, int64_t s, int64_t n,
                    int64_t c0, bool relu) {
  if (WithFixedShape<T>(g, [&](auto K, auto dil, auto, auto C) {
        InputGradFixed<T, K, dil, C>(g, gp, x, k, dx, s, n, c0, relu);
      })) {
    return;
  }
  const int64_t Wp = g.W + 2 * g.pad, Hp = g.H + 2 * g.pad, C = g.C, reach = 2 * g.pad;
  for (int64_t h = 0; h < g.H; ++h) {
    for (int64_t w = 0; w < g.W; ++w) {
      T a{};
      for (int64_t d = 0; d < g.D; ++d)
        for (int64_t i = 0; i < g.K; ++i)
          for (int64_t j = 0; j < g.K; ++j)
            a += Load<T>(gp + ((d * Hp + h + reach - i * g.dilation) * Wp + w + reach - j * g.dilation) *
                                  C + c0) *
                 Load<T>(k + g.Tap(i, j, d, s) + c0);
      const int64_t at = g.X(s, n, h, w) + c0;
      if (relu) a = Load<T>(x + at) > T{} ? a : T{};
      Store(dx + at, a);
    }
  }
}

// Stride 2, shapes without a fixed-shape loop: each output pixel's g
// scattered onto its taps of a padded buffer.
template <typename T>
void InputGradScatterBlock(const Geometry& g, Images gy, const float* __restrict k,
                           float* __restrict dxp, int64_t s, int64_t c0) {
  const int64_t Wp = g.W + 2 * g.pad, C = g.C;
  for (int64_t d = 0; d < g.D; ++d) {
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const T gv = Load<T>(gy.At(d, (oh * g.Wo + ow) * C) + c0);
        float* __restrict base = dxp + (oh * g.stride * Wp + ow * g.stride) * C + c0;
        for (int64_t i = 0; i < g.K; ++i) {
          for (int64_t j = 0; j < g.K; ++j) {
            float* __restrict dv = base + (i * g.dilation * Wp + j * g.dilation) * C;
            Store(dv, Load<T>(dv) + gv * Load<T>(k + g.Tap(i, j, d, s) + c0));
          }
        }
      }
    }
  }
}

void Forward(const Geometry& g, const float* x, const float* k, float* y, int64_t item,
             bool relu) {
  static thread_local std::vector<float> xp;
  const int64_t s = item / g.N, n = item % g.N;
  PadImage(g, x, s, n, relu, xp);
  const Images out = Images::Global(g, y, s, n);
  ForBlocks(g.C, [&](auto t, int64_t c0) { ForwardBlock<decltype(t)>(g, xp.data(), k, out, s, c0); });
}

// One image n of source s, given xp (its padded, relu'd copy) and gy (its D
// cotangent images): dx[s, n] (Σ over the D edges of the transposed conv;
// zero where relu clipped x) and part[tap, d, c] += its kernel gradient.
void BackwardImage(const Geometry& g, const float* __restrict x, const float* __restrict xp,
                   const float* __restrict k, Images gy, float* __restrict dx,
                   float* __restrict part, int64_t s, int64_t n, bool relu) {
  static thread_local std::vector<float> buf;
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, C = g.C;
  ForBlocks(C, [&](auto t, int64_t c0) { KernelGradBlock<decltype(t)>(g, xp, gy, part, c0); });
  if (g.stride == 1) {  // buf: the D cotangent images, each padded
    buf.resize(g.D * Hp * Wp * C);
    for (int64_t d = 0; d < g.D; ++d)
      PadRows(gy.At(d, 0), g.Wo * C, g.Ho, g.Wo, C, g.pad, false, buf.data() + d * Hp * Wp * C);
    ForBlocks(C, [&](auto t, int64_t c0) {
      InputGradBlock<decltype(t)>(g, buf.data(), x, k, dx, s, n, c0, relu);
    });
    return;
  }
  bool fixed = true;  // every channel block has its fixed-shape loop
  ForBlocks(C, [&](auto t, int64_t) { fixed &= WithFixedShape<decltype(t)>(g, [](auto...) {}); });
  if (fixed) {  // buf: the D cotangent images, each padded
    const int64_t Hq = g.Ho + 2 * g.pad, Wq = g.Wo + 2 * g.pad;
    buf.resize(g.D * Hq * Wq * C);
    for (int64_t d = 0; d < g.D; ++d)
      PadRows(gy.At(d, 0), g.Wo * C, g.Ho, g.Wo, C, g.pad, false, buf.data() + d * Hq * Wq * C);
    ForBlocks(C, [&](auto t, int64_t c0) {
      WithFixedShape<decltype(t)>(g, [&](auto K, auto dil, auto, auto CC) {
        InputGradStride2Fixed<decltype(t), K, dil, CC>(g, buf.data(), x, k, dx, s, n, c0, relu);
      });
    });
    return;
  }
  buf.assign(Hp * Wp * C, 0.0f);  // buf: dx padded, scattered into
  ForBlocks(C, [&](auto t, int64_t c0) { InputGradScatterBlock<decltype(t)>(g, gy, k, buf.data(), s, c0); });
  for (int64_t h = 0; h < g.H; ++h) {
    const float* __restrict src = buf.data() + ((h + g.pad) * Wp + g.pad) * C;
    const float* __restrict xv = x + g.X(s, n, h, 0);
    float* __restrict dst = dx + g.X(s, n, h, 0);
    for (int64_t c = 0; c < g.W * C; ++c) dst[c] = !relu || xv[c] > 0.0f ? src[c] : 0.0f;
  }
}

void Backward(const Geometry& g, const float* x, const float* k, const float* gy, float* dx,
              float* part, int64_t s, int64_t n0, int64_t n1, bool relu) {
  static thread_local std::vector<float> xp;
  std::memset(part, 0, sizeof(float) * g.K * g.K * g.D * g.C);
  for (int64_t n = n0; n < n1; ++n) {
    PadImage(g, x, s, n, relu, xp);
    BackwardImage(g, x, xp.data(), k, Images::Global(g, gy, s, n), dx, part, s, n, relu);
  }
}

// dk[tap, d, s, c] = Σ over the chunks of parts[s, chunk][tap, d, c].
void SumKernelParts(const Geometry& g, const float* parts, int64_t chunks, float* dk) {
  const int64_t tap_size = g.K * g.K * g.D * g.C;
  for (int64_t t = 0; t < g.K * g.K; ++t) {
    for (int64_t d = 0; d < g.D; ++d) {
      for (int64_t s = 0; s < g.S; ++s) {
        float* out = dk + ((t * g.D + d) * g.S + s) * g.C;
        std::memset(out, 0, sizeof(float) * g.C);
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const float* p = parts + (s * chunks + chunk) * tap_size + (t * g.D + d) * g.C;
          for (int64_t c = 0; c < g.C; ++c) out[c] += p[c];
        }
      }
    }
  }
}

ffi::Error DepthwiseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                            int64_t stride, int64_t dilation, bool relu) {
  Geometry g;
  if (ffi::Error e = Geometry::From(x, kernel, stride, dilation, &g); e.failure()) return e;
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, g.S * g.N, [&](int64_t item) { Forward(g, xp, kp, yp, item, relu); });
  return ffi::Error::Success();
}

ffi::Error DepthwiseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> gy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                             int64_t stride, int64_t dilation, bool relu) {
  Geometry g;
  if (ffi::Error e = Geometry::From(x, kernel, stride, dilation, &g); e.failure()) return e;
  // Each item is a chunk of images of one source with its own partial kernel
  // gradient (summed below): enough items to balance the threads.
  const int64_t chunks = std::min<int64_t>(g.N, 8);
  const int64_t tap_size = g.K * g.K * g.D * g.C;
  std::vector<float> parts(g.S * chunks * tap_size);
  const float *xp = x.typed_data(), *kp = kernel.typed_data(), *gp = gy.typed_data();
  float* dxp = dx->typed_data();
  ParallelFor(pool, g.S * chunks, [&](int64_t item) {
    const int64_t s = item / chunks, c = item % chunks;
    const int64_t n0 = g.N * c / chunks, n1 = g.N * (c + 1) / chunks;
    float* part = parts.data() + item * tap_size;
    Backward(g, xp, kp, gp, dxp, part, s, n0, n1, relu);
  });
  SumKernelParts(g, parts.data(), chunks, dk->typed_data());
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------
// DilConv in training: ReLU -> depthwise -> 1x1 conv, with the batch
// statistics of its output for BN (normalised in XLA, where it fuses into the
// consumer), and its backward pass. The depthwise output never reaches
// memory: each image's is recomputed in the cache where it is needed.
// pw [G, C, F] with G = D·S (edge g = d·S + s); h, dy [G, N, H', W', F].

// out[p, f0:] = Σ_k in[p, k] · w[k, f0:] over P pixels (one image's 1x1
// conv), NB blocks of T from f0, a tile of R pixels at a time: R·NB
// independent sums in registers; each weight load feeds R products and each
// broadcast of an input NB. (One block of 8 pixels, the first version, was
// load-bound: 9 loads per 8 products.) Adds Σ_p out and Σ_p out² to
// sum[f0:] and sumsq[f0:] if given. KD > 0: the inner size is that constant
// (the R rows' addresses a register plus a constant); 0: kd at run time.
template <typename T, int KD, int NB>
void MatMulTiles(const float* __restrict in, const float* __restrict w, float* __restrict out,
                 int64_t P, int64_t kd, int64_t Fo, int64_t f0, float* sum, float* sumsq) {
  constexpr int L = sizeof(T) / sizeof(float);
  const int64_t Kd = KD > 0 ? KD : kd;
  T s1[NB] = {}, s2[NB] = {};
  auto tile = [&](auto r, int64_t p) {
    constexpr int R = decltype(r)::value;
    T a[R][NB] = {};
    const float* __restrict row = in + p * Kd;
    for (int64_t k = 0; k < Kd; ++k) {
      T wv[NB];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) wv[b] = Load<T>(w + k * Fo + f0 + b * L);
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        const float x = row[q * Kd + k];
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) a[q][b] += x * wv[b];
      }
    }
#pragma GCC unroll 8
    for (int q = 0; q < R; ++q) {
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        Store(out + (p + q) * Fo + f0 + b * L, a[q][b]);
        s1[b] += a[q][b];
        s2[b] += a[q][b] * a[q][b];
      }
    }
  };
  constexpr int kTile = NB == 1 ? 8 : 6;  // 8 or 12 sums: both FMA units busy
  int64_t p = 0;
  for (; p + kTile <= P; p += kTile) tile(Int<kTile>{}, p);
  for (; p < P; ++p) tile(Int<1>{}, p);
  if (sum != nullptr) {
    for (int b = 0; b < NB; ++b) {
      Store(sum + f0 + b * L, Load<T>(sum + f0 + b * L) + s1[b]);
      Store(sumsq + f0 + b * L, Load<T>(sumsq + f0 + b * L) + s2[b]);
    }
  }
}

// The 1x1 conv of one image over all Fo outputs: pairs of vector blocks,
// then single ones, then single channels.
template <int KD>
void MatMulFixed(const float* in, const float* w, float* out, int64_t P, int64_t Kd, int64_t Fo,
                 float* sum, float* sumsq) {
  int64_t f0 = 0;
  for (; f0 + 2 * kWide <= Fo; f0 += 2 * kWide) MatMulTiles<VW, KD, 2>(in, w, out, P, Kd, Fo, f0, sum, sumsq);
  ForBlocks(Fo - f0, [&](auto t, int64_t c0) {
    MatMulTiles<decltype(t), KD, 1>(in, w, out, P, Kd, Fo, f0 + c0, sum, sumsq);
  });
}

// out [P, Fo] = in [P, Kd] · w [Kd, Fo]; see MatMulTiles.
void MatMul(const float* in, const float* w, float* out, int64_t P, int64_t Kd, int64_t Fo,
            float* sum, float* sumsq) {
  switch (Kd) {
    case 8: return MatMulFixed<8>(in, w, out, P, Kd, Fo, sum, sumsq);
    case 16: return MatMulFixed<16>(in, w, out, P, Kd, Fo, sum, sumsq);
    case 32: return MatMulFixed<32>(in, w, out, P, Kd, Fo, sum, sumsq);
    case 64: return MatMulFixed<64>(in, w, out, P, Kd, Fo, sum, sumsq);
    default: return MatMulFixed<0>(in, w, out, P, Kd, Fo, sum, sumsq);
  }
}

// dw[c, f0:] += Σ_p a[p, c] · dh[p, f0:] (one image's 1x1 weight gradient)
// for NB blocks of T from f0, R channels c at a time: R·NB sums in
// registers, NB loads of dh and R broadcasts of a per pixel.
template <typename T, int NB>
void OuterTiles(const float* __restrict a, const float* __restrict dh, float* __restrict dw,
                int64_t P, int64_t C, int64_t F, int64_t f0) {
  constexpr int L = sizeof(T) / sizeof(float);
  auto rows = [&](auto r, int64_t c) {
    constexpr int R = decltype(r)::value;
    T acc[R][NB] = {};
    for (int64_t p = 0; p < P; ++p) {
      T gv[NB];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) gv[b] = Load<T>(dh + p * F + f0 + b * L);
      const float* __restrict ap = a + p * C + c;
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        const float x = ap[q];
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) acc[q][b] += x * gv[b];
      }
    }
    for (int q = 0; q < R; ++q) {
      for (int b = 0; b < NB; ++b) {
        float* out = dw + (c + q) * F + f0 + b * L;
        Store(out, Load<T>(out) + acc[q][b]);
      }
    }
  };
  constexpr int kRows = NB == 1 ? 8 : 6;  // 8 or 12 sums: both FMA units busy
  int64_t c = 0;
  for (; c + kRows <= C; c += kRows) rows(Int<kRows>{}, c);
  for (; c + 4 <= C; c += 4) rows(Int<4>{}, c);
  for (; c + 2 <= C; c += 2) rows(Int<2>{}, c);
  for (; c < C; ++c) rows(Int<1>{}, c);
}

// dw [C, F] += a [P, C]ᵀ · dh [P, F]; see OuterTiles.
void Outer(const float* a, const float* dh, float* dw, int64_t P, int64_t C, int64_t F) {
  int64_t f0 = 0;
  for (; f0 + 2 * kWide <= F; f0 += 2 * kWide) OuterTiles<VW, 2>(a, dh, dw, P, C, F, f0);
  ForBlocks(F - f0, [&](auto t, int64_t c0) { OuterTiles<decltype(t), 1>(a, dh, dw, P, C, F, f0 + c0); });
}

ffi::Error CheckPointwise(const Geometry& g, ffi::Buffer<ffi::F32>& pw) {
  auto d = pw.dimensions();
  if (d.size() != 3 || d[0] != g.D * g.S || d[1] != g.C) {
    return ffi::Error::InvalidArgument("dilconv: the 1x1 kernel must be [D*S, C, F]");
  }
  return ffi::Error::Success();
}

// The depthwise outputs of image n of source s for all D edges, into a.
Images DepthwiseImage(const Geometry& g, const float* x, const float* k, int64_t s, int64_t n,
                      std::vector<float>& xp, std::vector<float>& abuf, const float* norm) {
  PadImage(g, x, s, n, true, xp, norm);
  const Images a = Images::Local(g, abuf, g.C);
  ForBlocks(g.C, [&](auto t, int64_t c0) { ForwardBlock<decltype(t)>(g, xp.data(), k, a, s, c0); });
  return a;
}

// BN's batch mean and biased variance, E[h²] − E[h]², of E groups [E, F] from
// per-image partial sums part(e, n) -> [Σh, Σh²][F] (m values per statistic),
// summed over the N images in double and in a fixed order.
template <typename Part>
void MomentsFromParts(int64_t E, int64_t N, int64_t F, double m, Part part, float* mean,
                      float* var) {
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t f = 0; f < F; ++f) {
      double s1 = 0, s2 = 0;
      for (int64_t n = 0; n < N; ++n) s1 += part(e, n)[f], s2 += part(e, n)[F + f];
      const double mu = s1 / m;
      mean[e * F + f] = static_cast<float>(mu);
      var[e * F + f] = static_cast<float>(std::max(s2 / m - mu * mu, 0.0));
    }
  }
}

// out_a[e, f] = Σ_n part(e, n)[f] and out_b[e, f] = Σ_n part(e, n)[F + f]
// for E groups [E, F] of per-image partial sums [2][F], summed over the N
// images in double and in a fixed order (results independent of threads).
template <typename Part>
void SumsFromParts(int64_t E, int64_t N, int64_t F, Part part, float* out_a, float* out_b) {
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t f = 0; f < F; ++f) {
      double a = 0, b = 0;
      for (int64_t n = 0; n < N; ++n) a += part(e, n)[f], b += part(e, n)[F + f];
      out_a[e * F + f] = static_cast<float>(a);
      out_b[e * F + f] = static_cast<float>(b);
    }
  }
}

// The input normalisation of a DilConv: [2, S, C] (mean, rstd) if
// `normalized` (the input is a BN's raw input: relu((x − mean)·rstd)), else null.
ffi::Error InputNorm(const Geometry& g, ffi::Buffer<ffi::F32>& norm, bool normalized,
                     const float** out) {
  *out = nullptr;
  if (!normalized) return ffi::Error::Success();
  if (norm.element_count() != 2 * g.S * g.C) {
    return ffi::Error::InvalidArgument("dilconv: the input normalisation must be [2,S,C]");
  }
  *out = norm.typed_data();
  return ffi::Error::Success();
}

ffi::Error DilConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                          ffi::Buffer<ffi::F32> pw, ffi::Buffer<ffi::F32> norm,
                          ffi::ResultBuffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> mean,
                          ffi::ResultBuffer<ffi::F32> var, int64_t stride, int64_t dilation,
                          bool normalized) {
  Geometry g;
  if (ffi::Error e = Geometry::From(x, kernel, stride, dilation, &g); e.failure()) return e;
  if (ffi::Error e = CheckPointwise(g, pw); e.failure()) return e;
  const float* nv;
  if (ffi::Error e = InputNorm(g, norm, normalized, &nv); e.failure()) return e;
  const int64_t F = pw.dimensions()[2], P = g.Ho * g.Wo, C = g.C;
  const float *xv = x.typed_data(), *kv = kernel.typed_data(), *wv = pw.typed_data();
  float* hv = h->typed_data();
  std::vector<float> parts(g.S * g.N * g.D * 2 * F, 0.0f);  // per image: [D][Σh, Σh²][F]
  ParallelFor(pool, g.S * g.N, [&](int64_t item) {
    static thread_local std::vector<float> xp, abuf;
    const int64_t s = item / g.N, n = item % g.N;
    const Images a = DepthwiseImage(g, xv, kv, s, n, xp, abuf, nv);
    for (int64_t d = 0; d < g.D; ++d) {
      const int64_t e = d * g.S + s;
      float* part = parts.data() + (item * g.D + d) * 2 * F;
      MatMul(a.At(d, 0), wv + e * C * F, hv + (e * g.N + n) * P * F, P, C, F, part, part + F);
    }
  });
  MomentsFromParts(g.D * g.S, g.N, F, static_cast<double>(g.N * P), [&](int64_t e, int64_t n) {
    return parts.data() + ((e % g.S * g.N + n) * g.D + e / g.S) * 2 * F;  // edge e = d·S + s
  }, mean->typed_data(), var->typed_data());
  return ffi::Error::Success();
}

// Σ dy and Σ dy·(h − mean) over (N, H', W') per (edge, channel): BN's
// backward reductions. h, dy [G, N, H', W', F]; mean [G, F].
ffi::Error BnGradSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> dy,
                      ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> sum_dy,
                      ffi::ResultBuffer<ffi::F32> sum_dy_centred) {
  auto hd = h.dimensions();
  if (hd.size() != 5 || dy.element_count() != h.element_count() ||
      mean.element_count() != hd[0] * hd[4]) {
    return ffi::Error::InvalidArgument("bn_grad_sums: h and dy [G,N,H,W,F], mean [G,F]");
  }
  const int64_t G = hd[0], N = hd[1], P = hd[2] * hd[3], F = hd[4];
  const float *hv = h.typed_data(), *dv = dy.typed_data(), *mv = mean.typed_data();
  std::vector<float> parts(G * N * 2 * F);
  ParallelFor(pool, G * N, [&](int64_t item) {
    const int64_t e = item / N;
    const float* hp = hv + item * P * F;
    const float* dp = dv + item * P * F;
    float* part = parts.data() + item * 2 * F;
    ForBlocks(F, [&](auto t, int64_t f0) {
      using T = decltype(t);
      const T mu = Load<T>(mv + e * F + f0);
      T a{}, b{};
      for (int64_t p = 0; p < P; ++p) {
        const T gv = Load<T>(dp + p * F + f0);
        a += gv;
        b += gv * (Load<T>(hp + p * F + f0) - mu);
      }
      Store(part + f0, a);
      Store(part + F + f0, b);
    });
  });
  SumsFromParts(G, N, F, [&](int64_t e, int64_t n) { return parts.data() + (e * N + n) * 2 * F; },
                sum_dy->typed_data(), sum_dy_centred->typed_data());
  return ffi::Error::Success();
}

// The input gradient of image n of source s through relu((x − mean)·rstd),
// in place: dx holds t' (the gradient reaching the ReLU's output); becomes
// rstd·t with t = t' where x1 = (x − mean)·rstd > 0, else 0; part [2, C] =
// (Σ t, Σ t·x1) over the image.
void NormalizedInputGrad(const Geometry& g, const float* x, const float* norm, float* dx,
                         float* part, int64_t s, int64_t n) {
  const int64_t C = g.C, P = g.H * g.W;
  const float *xi = x + g.X(s, n, 0, 0), *mu = norm + s * C, *rs = norm + (g.S + s) * C;
  float* di = dx + g.X(s, n, 0, 0);
  ForBlocks(C, [&](auto t, int64_t c0) {
    using T = decltype(t);
    const T m = Load<T>(mu + c0), r = Load<T>(rs + c0);
    T s1{}, s2{};
    for (int64_t p = 0; p < P; ++p) {
      const T x1 = (Load<T>(xi + p * C + c0) - m) * r;
      const T tv = x1 > T{} ? Load<T>(di + p * C + c0) : T{};  // elementwise select
      s1 += tv;
      s2 += tv * x1;
      Store(di + p * C + c0, r * tv);
    }
    Store(part + c0, s1);
    Store(part + C + c0, s2);
  });
}

// dx, d(depthwise kernel), d(1x1 kernel) of the DilConv, given the gradient
// reaching h as dh = A·dy + B·(h − mean) + C0 (coef [4, G, F]: A, B, C0,
// mean; BN's backward, its coefficients from BnGradSums, formed in XLA).
// With a normalised input (`norm`, see InputNorm) x1 = (x − mean)·rstd: dx
// is the gradient reaching x, rstd·t with t the one reaching x1, and
// norm_sums [2, S, C] = (Σ t, Σ t·x1) over (N, H, W): the rest of the input
// BN's backward (ops.dilconv_raw). Else norm_sums is zero.
ffi::Error DilConvBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> pw,
                           ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> norm,
                           ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                           ffi::ResultBuffer<ffi::F32> dpw, ffi::ResultBuffer<ffi::F32> norm_sums,
                           int64_t stride, int64_t dilation, bool normalized) {
  Geometry g;
  if (ffi::Error e = Geometry::From(x, kernel, stride, dilation, &g); e.failure()) return e;
  if (ffi::Error e = CheckPointwise(g, pw); e.failure()) return e;
  const float* nv;
  if (ffi::Error e = InputNorm(g, norm, normalized, &nv); e.failure()) return e;
  const int64_t F = pw.dimensions()[2], P = g.Ho * g.Wo, C = g.C, G = g.D * g.S;
  if (h.element_count() != G * g.N * P * F || dy.element_count() != h.element_count() ||
      coef.element_count() != 4 * G * F) {
    return ffi::Error::InvalidArgument("dilconv_backward: h, dy [G,N,H',W',F] and coef [4,G,F]");
  }
  const float *xv = x.typed_data(), *kv = kernel.typed_data(), *wv = pw.typed_data();
  const float *hv = h.typed_data(), *dyv = dy.typed_data(), *cv = coef.typed_data();
  std::vector<float> pw_t(G * F * C);  // [G, F, C]: da = dh · pw_t is a MatMul
  for (int64_t e = 0; e < G; ++e)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t f = 0; f < F; ++f) pw_t[(e * F + f) * C + c] = wv[(e * C + c) * F + f];
  const int64_t chunks = std::min<int64_t>(g.N, 8);
  const int64_t tap_size = g.K * g.K * g.D * C, pw_size = g.D * C * F;
  std::vector<float> parts(g.S * chunks * tap_size), pw_parts(g.S * chunks * pw_size, 0.0f);
  std::vector<float> norm_parts(nv == nullptr ? 0 : g.S * g.N * 2 * C);  // per image: [Σt, Σt·x1][C]
  float* dxv = dx->typed_data();
  ParallelFor(pool, g.S * chunks, [&](int64_t item) {
    static thread_local std::vector<float> xp, abuf, dhbuf, dabuf;
    const int64_t s = item / chunks, chunk = item % chunks;
    float* part = parts.data() + item * tap_size;
    float* pw_part = pw_parts.data() + item * pw_size;
    std::memset(part, 0, sizeof(float) * tap_size);
    for (int64_t n = g.N * chunk / chunks; n < g.N * (chunk + 1) / chunks; ++n) {
      const Images a = DepthwiseImage(g, xv, kv, s, n, xp, abuf, nv);
      const Images dh = Images::Local(g, dhbuf, F), da = Images::Local(g, dabuf, C);
      for (int64_t d = 0; d < g.D; ++d) {
        const int64_t e = d * g.S + s;
        const float* hp = hv + (e * g.N + n) * P * F;
        const float* dp = dyv + (e * g.N + n) * P * F;
        ForBlocks(F, [&](auto t, int64_t f0) {
          using T = decltype(t);
          const T A = Load<T>(cv + e * F + f0), B = Load<T>(cv + (G + e) * F + f0);
          const T C0 = Load<T>(cv + (2 * G + e) * F + f0), mu = Load<T>(cv + (3 * G + e) * F + f0);
          float* out = dh.At(d, 0);
          for (int64_t p = 0; p < P; ++p)
            Store(out + p * F + f0, A * Load<T>(dp + p * F + f0) + B * (Load<T>(hp + p * F + f0) - mu) + C0);
        });
        Outer(a.At(d, 0), dh.At(d, 0), pw_part + d * C * F, P, C, F);
        MatMul(dh.At(d, 0), pw_t.data() + e * F * C, da.At(d, 0), P, F, C, nullptr, nullptr);
      }
      BackwardImage(g, xv, xp.data(), kv, da, dxv, part, s, n, nv == nullptr);
      if (nv != nullptr) NormalizedInputGrad(g, xv, nv, dxv, norm_parts.data() + (s * g.N + n) * 2 * C, s, n);
    }
  });
  float* sums = norm_sums->typed_data();
  if (nv == nullptr) {
    std::memset(sums, 0, sizeof(float) * 2 * g.S * C);
  } else {
    SumsFromParts(g.S, g.N, C, [&](int64_t s, int64_t n) { return norm_parts.data() + (s * g.N + n) * 2 * C; },
                  sums, sums + g.S * C);
  }
  SumKernelParts(g, parts.data(), chunks, dk->typed_data());
  for (int64_t e = 0; e < G; ++e) {  // dpw[e] = Σ over the chunks of its source
    const int64_t d = e / g.S, s = e % g.S;
    float* out = dpw->typed_data() + e * C * F;
    std::memset(out, 0, sizeof(float) * C * F);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* p = pw_parts.data() + (s * chunks + chunk) * pw_size + d * C * F;
      for (int64_t i = 0; i < C * F; ++i) out[i] += p[i];
    }
  }
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------
// The cell's mixer, backward, for a DilConv term that it normalises itself
// (its raw output h with BN's batch statistics): the term's cotangent
// dh = w·keep·rstd·g and, per (edge, channel), q = Σ keep·g·(h − mean) and
// r = Σ keep·g over (N, H', W'), from which BN's and the edge weight's
// gradients follow (ops.mix_edges). One pass over g and h instead of XLA's
// normalised copy of h, its weight-gradient reduction and BN's two.
// g [D, N, H', W', F] (the D destination nodes' cotangents); keep [G, N];
// h, dh [G, N, H', W', F] (edge e = d·S + s); mean, rstd [G, F]; w [G].
ffi::Error MixGradRaw(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> keep,
                      ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> mean,
                      ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> q,
                      ffi::ResultBuffer<ffi::F32> r) {
  auto hd = h.dimensions(), gd = g.dimensions();
  if (hd.size() != 5 || gd.size() != 5 || gd[0] < 1 || hd[0] % gd[0] || gd[1] != hd[1] ||
      g.element_count() / gd[0] != h.element_count() / hd[0] ||
      keep.element_count() != hd[0] * hd[1] || mean.element_count() != hd[0] * hd[4] ||
      rstd.element_count() != mean.element_count() || w.element_count() != hd[0]) {
    return ffi::Error::InvalidArgument(
        "mix_grad_raw: g [D,N,H,W,F], keep [G,N], h [G,N,H,W,F], mean and rstd [G,F], w [G]");
  }
  const int64_t G = hd[0], N = hd[1], P = hd[2] * hd[3], F = hd[4], S = G / gd[0];
  const float *gv = g.typed_data(), *kv = keep.typed_data(), *hv = h.typed_data();
  const float *mv = mean.typed_data(), *rv = rstd.typed_data(), *wv = w.typed_data();
  float* dv = dh->typed_data();
  std::vector<float> parts(G * N * 2 * F);
  ParallelFor(pool, G * N, [&](int64_t item) {
    const int64_t e = item / N, n = item % N;
    const float k = kv[item], scale = wv[e] * k;
    const float* gp = gv + ((e / S) * N + n) * P * F;
    const float* hp = hv + item * P * F;
    float* out = dv + item * P * F;
    float* part = parts.data() + item * 2 * F;
    ForBlocks(F, [&](auto t, int64_t f0) {
      using T = decltype(t);
      const T mu = Load<T>(mv + e * F + f0), a = scale * Load<T>(rv + e * F + f0);
      T sq{}, sr{};
      for (int64_t p = 0; p < P; ++p) {
        const T gg = Load<T>(gp + p * F + f0);
        Store(out + p * F + f0, a * gg);
        sr += gg;
        sq += gg * (Load<T>(hp + p * F + f0) - mu);
      }
      Store(part + f0, k * sq);
      Store(part + F + f0, k * sr);
    });
  });
  SumsFromParts(G, N, F, [&](int64_t e, int64_t n) { return parts.data() + (e * N + n) * 2 * F; },
                q->typed_data(), r->typed_data());
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------
// 3x3 pools in training, padding 1 (max: the padding never wins; avg: it is
// left out of the count, PyTorch's count_include_pad=False), with the batch
// statistics of their output for the BN that follows them in a search cell;
// and their backward pass, given the gradient reaching the pooled output as
// A·dy + B·ŷ + C0 (ŷ the normalised output, kept by the cell's mixer).
// On XLA:CPU a pool with its BN was ~14 fused kernels (forward and backward).
// x, dx [S, N, H, W, C]; y, ŷ, dy [S, N, H', W', C]; statistics [S, C].

struct PoolGeometry {
  int64_t S, N, H, W, C, Ho, Wo, stride;

  static ffi::Error From(ffi::Buffer<ffi::F32>& x, int64_t stride, PoolGeometry* out) {
    auto d = x.dimensions();
    if (d.size() != 5 || stride < 1) {
      return ffi::Error::InvalidArgument("pool: x must be [S,N,H,W,C] and the stride >= 1");
    }
    *out = {d[0], d[1], d[2], d[3], d[4], (d[2] - 1) / stride + 1, (d[3] - 1) / stride + 1, stride};
    return ffi::Error::Success();
  }
  // The input rows (or columns) [lo, hi) that output row o's window covers.
  void Window(int64_t o, int64_t size, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(o * stride - 1, 0);
    *hi = std::min<int64_t>(o * stride + 2, size);
  }
};

template <typename T>
inline T Max(T a, T b) {
  return b > a ? b : a;  // vectors: a lane-wise select
}

// y = the pool of one image x [H, W, C], channels [c0, c0 + lanes); adds Σy
// and Σy² to s1 and s2.
template <typename T>
void PoolImage(const PoolGeometry& g, const float* __restrict x, float* __restrict y, bool is_max,
               int64_t c0, T& s1, T& s2) {
  const int64_t C = g.C;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    int64_t h0, h1;
    g.Window(oh, g.H, &h0, &h1);
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      int64_t w0, w1;
      g.Window(ow, g.W, &w0, &w1);
      T a = is_max ? Load<T>(x + (h0 * g.W + w0) * C + c0) : T{};
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const T v = Load<T>(x + (h * g.W + w) * C + c0);
          a = is_max ? Max(a, v) : a + v;
        }
      }
      if (!is_max) a = a * (1.0f / static_cast<float>((h1 - h0) * (w1 - w0)));
      Store(y + (oh * g.Wo + ow) * C + c0, a);
      s1 += a;
      s2 += a * a;
    }
  }
}

// dx of one image: each output pixel's gradient A·dy + B·ŷ + C0 routed to its
// window (max: to the first maximal pixel in row-major order, as XLA's
// select-and-scatter; avg: shared equally by the window's pixels).
template <typename T>
void PoolGradImage(const PoolGeometry& g, const float* __restrict x, const float* __restrict yhat,
                   const float* __restrict dy, const float* __restrict coef, float* __restrict dx,
                   bool is_max, int64_t s, int64_t c0) {
  const int64_t C = g.C, SC = g.S * C;
  const T A = Load<T>(coef + s * C + c0), B = Load<T>(coef + SC + s * C + c0);
  const T C0 = Load<T>(coef + 2 * SC + s * C + c0);
  for (int64_t p = 0; p < g.H * g.W; ++p) Store(dx + p * C + c0, T{});
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    int64_t h0, h1;
    g.Window(oh, g.H, &h0, &h1);
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      int64_t w0, w1;
      g.Window(ow, g.W, &w0, &w1);
      const int64_t o = (oh * g.Wo + ow) * C + c0;
      T grad = A * Load<T>(dy + o) + B * Load<T>(yhat + o) + C0;
      if (is_max) {
        // The winner's pixel index per lane (exact in float below 2^24 pixels).
        T best = Load<T>(x + (h0 * g.W + w0) * C + c0), at = T{} + static_cast<float>(h0 * g.W + w0);
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const T v = Load<T>(x + (h * g.W + w) * C + c0), here = T{} + static_cast<float>(h * g.W + w);
            at = v > best ? here : at;  // strictly greater: ties stay with the earlier pixel
            best = Max(best, v);
          }
        }
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            float* d = dx + (h * g.W + w) * C + c0;
            Store(d, Load<T>(d) + (at == T{} + static_cast<float>(h * g.W + w) ? grad : T{}));
          }
        }
      } else {
        grad = grad * (1.0f / static_cast<float>((h1 - h0) * (w1 - w0)));
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            float* d = dx + (h * g.W + w) * C + c0;
            Store(d, Load<T>(d) + grad);
          }
        }
      }
    }
  }
}

ffi::Error PoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                       int64_t stride, bool is_max) {
  PoolGeometry g;
  if (ffi::Error e = PoolGeometry::From(x, stride, &g); e.failure()) return e;
  const int64_t C = g.C, in_size = g.H * g.W * C, out_size = g.Ho * g.Wo * C;
  const float* xv = x.typed_data();
  float* yv = y->typed_data();
  std::vector<float> parts(g.S * g.N * 2 * C);  // per image: [Σy, Σy²][C]
  ParallelFor(pool, g.S * g.N, [&](int64_t item) {
    float* part = parts.data() + item * 2 * C;
    ForBlocks(C, [&](auto t, int64_t c0) {
      using T = decltype(t);
      T s1{}, s2{};
      PoolImage<T>(g, xv + item * in_size, yv + item * out_size, is_max, c0, s1, s2);
      Store(part + c0, s1);
      Store(part + C + c0, s2);
    });
  });
  MomentsFromParts(g.S, g.N, C, static_cast<double>(g.N * g.Ho * g.Wo), [&](int64_t s, int64_t n) {
    return parts.data() + (s * g.N + n) * 2 * C;
  }, mean->typed_data(), var->typed_data());
  return ffi::Error::Success();
}

ffi::Error PoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> yhat,
                        ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> coef,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t stride, bool is_max) {
  PoolGeometry g;
  if (ffi::Error e = PoolGeometry::From(x, stride, &g); e.failure()) return e;
  const int64_t C = g.C, in_size = g.H * g.W * C, out_size = g.Ho * g.Wo * C;
  if (yhat.element_count() != g.S * g.N * out_size || dy.element_count() != yhat.element_count() ||
      coef.element_count() != 3 * g.S * C) {
    return ffi::Error::InvalidArgument("pool_backward: yhat, dy [S,N,H',W',C] and coef [3,S,C]");
  }
  const float *xv = x.typed_data(), *hv = yhat.typed_data(), *dv = dy.typed_data();
  const float* cv = coef.typed_data();
  float* dxv = dx->typed_data();
  ParallelFor(pool, g.S * g.N, [&](int64_t item) {
    ForBlocks(C, [&](auto t, int64_t c0) {
      PoolGradImage<decltype(t)>(g, xv + item * in_size, hv + item * out_size, dv + item * out_size,
                                 cv, dxv + item * in_size, is_max, item / g.N, c0);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasDepthwiseForward, DepthwiseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("dilation")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasDepthwiseBackward, DepthwiseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("dilation")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasDilConvForward, DilConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("dilation")
                                  .Attr<bool>("normalized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasBnGradSums, BnGradSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasDilConvBackward, DilConvBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("dilation")
                                  .Attr<bool>("normalized"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasPoolForward, PoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("is_max"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasPoolBackward, PoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("is_max"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SnasMixGradRaw, MixGradRaw,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
