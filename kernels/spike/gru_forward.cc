// Spike for issue 21's gate: the forward loop of one GRU layer as an XLA FFI
// handler for the CPU, float32 only. Gates in (the input projection `gates_x`
// without its bias, computed by XLA), states out. Built and timed by benchmarks/fused_spike.py;
// not part of stackrnn.
//
// Layout: batch-major, `gates_x` of shape (*batch, time, 3H) where `*batch` are the
// axes `jax.vmap` adds (`vmap_method="expand_dims"`); `weight_hh` (3H, H),
// `bias_hh` (3H,) and the initial state (H,) unbatched (leading axes of size 1).
// Rows are independent: a block of 4 rows runs the whole time loop with its state
// in cache; blocks are split over XLA's FFI thread pool (at most `max_threads`
// parts), so no thread of the kernel's own enters XLA's process.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float V __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int kLanes = 16;
constexpr int kRows = 4;

// out[r] = bias + in[r] @ m for R rows; `m` (k, n) row-major. Columns in groups of
// up to four vectors, whose accumulators stay in registers while `k` runs.
template <int R, int NV>
inline void Columns(const float* const* in, const float* m, int64_t k, int64_t n,
                    const float* bias, float* const* out, int64_t j0) {
  V acc[R][NV];
  for (int v = 0; v < NV; ++v) {
    V b = *reinterpret_cast<const V*>(bias + j0 + v * kLanes);
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t q = 0; q < k; ++q) {
    V w[NV];
    for (int v = 0; v < NV; ++v)
      w[v] = *reinterpret_cast<const V*>(m + q * n + j0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      float a = in[r][q];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      *reinterpret_cast<V*>(out[r] + j0 + v * kLanes) = acc[r][v];
}

template <int R>
inline void Product(const float* const* in, const float* m, int64_t k, int64_t n,
                    const float* bias, float* const* out) {
  int64_t j0 = 0;
  for (; j0 + 4 * kLanes <= n; j0 += 4 * kLanes) Columns<R, 4>(in, m, k, n, bias, out, j0);
  switch ((n - j0) / kLanes) {
    case 3: Columns<R, 3>(in, m, k, n, bias, out, j0); j0 += 3 * kLanes; break;
    case 2: Columns<R, 2>(in, m, k, n, bias, out, j0); j0 += 2 * kLanes; break;
    case 1: Columns<R, 1>(in, m, k, n, bias, out, j0); j0 += kLanes; break;
    default: break;
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = j0; j < n; ++j) {
      float acc = bias[j];
      for (int64_t q = 0; q < k; ++q) acc += in[r][q] * m[q * n + j];
      out[r][j] = acc;
    }
}

// Eigen's and XLA's rational tanh for float32; the sigmoid through it.
inline float Tanh(float x) {
  x = std::min(std::max(x, -7.90531110763549805f), 7.90531110763549805f);
  float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}
inline float Sigmoid(float x) { return 0.5f + 0.5f * Tanh(0.5f * x); }

// `bx`: the input projection's bias, added here rather than by XLA in a pass of its
// own over all steps' gates.
inline void Gates(int64_t H, const float* __restrict gx, const float* __restrict bx,
                  const float* __restrict gh, const float* __restrict h,
                  float* __restrict h1) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    float r = Sigmoid(gx[j] + bx[j] + gh[j]);
    float z = Sigmoid(gx[H + j] + bx[H + j] + gh[H + j]);
    float n = Tanh(gx[2 * H + j] + bx[2 * H + j] + r * gh[2 * H + j]);
    h1[j] = n + z * (h[j] - n);
  }
}

// Runs `work(begin, end)` over `[0, rows)` in up to `parts` parts, shared between
// the caller and XLA's FFI thread pool. Parts are claimed from a counter, so the
// caller never waits for a task that has not started.
template <typename F>
void Split(ffi::ThreadPool& pool, int64_t rows, int64_t parts, F work) {
  parts = std::min({parts, std::max<int64_t>(1, pool.num_threads()), rows / 16});
  if (parts <= 1) return work(0, rows);
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  int64_t per = (rows + parts - 1) / parts;
  auto run = [shared, parts, per, rows, work]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < parts;) {
      work(c * per, std::min(rows, (c + 1) * per));
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t c = 1; c < parts; ++c) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (shared->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

ffi::Error Forward(ffi::ThreadPool pool, int64_t max_threads, ffi::Buffer<ffi::F32> gx,
                   ffi::Buffer<ffi::F32> bias_ih, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> hs) {
  auto gd = gx.dimensions();
  const int64_t T = gd[gd.size() - 2], G = gd[gd.size() - 1], H = G / 3;
  const int64_t B = gx.element_count() / (T * G);
  if (w.element_count() != G * H || bias.element_count() != G ||
      bias_ih.element_count() != G ||
      h0.element_count() != H)
    return ffi::Error::InvalidArgument("gru_forward: unbatched weights expected");
  std::vector<float> wt(G * H);  // weight_hh transposed: a step reads it by rows
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < H; ++k) wt[k * G + g] = w.typed_data()[g * H + k];
  const float* gxp = gx.typed_data();
  float* hsp = hs->typed_data();
  auto rows = [&](int64_t begin, int64_t end) {
    std::vector<float> gh(kRows * G);
    for (int64_t b = begin; b < end; b += kRows) {
      int n = static_cast<int>(std::min<int64_t>(kRows, end - b));
      const float* prev[kRows];
      float* ghr[kRows];
      for (int r = 0; r < n; ++r) {
        prev[r] = h0.typed_data();
        ghr[r] = gh.data() + r * G;
      }
      for (int64_t t = 0; t < T; ++t) {
        if (n == kRows)
          Product<kRows>(prev, wt.data(), H, G, bias.typed_data(), ghr);
        else
          for (int r = 0; r < n; ++r)
            Product<1>(&prev[r], wt.data(), H, G, bias.typed_data(), &ghr[r]);
        for (int r = 0; r < n; ++r) {
          int64_t row = (b + r) * T + t;
          Gates(H, gxp + row * G, bias_ih.typed_data(), ghr[r], prev[r], hsp + row * H);
          prev[r] = hsp + row * H;
        }
      }
    }
  };
  Split(pool, B, max_threads, rows);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GruForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("max_threads")
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates_x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hs
);
