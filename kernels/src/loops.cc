// The sequential part of a recurrent layer as XLA FFI handlers for the CPU: the
// forward loop (projected input gates in, states out) and its reverse (state
// cotangents in, gate cotangents out). The input projection and every weight
// gradient stay matrix products in XLA, outside these loops.
//
// Layout: every array is batch-major, `(*batch, time, width)`, where `*batch` are
// the leading axes that `jax.vmap` adds (`vmap_method="expand_dims"`: an unbatched
// argument gets axes of size 1, so weights are never copied per example). Rows
// (batch entries) are independent, so a call splits them over XLA's own FFI thread
// pool and runs the whole time loop of a block of rows with its state in cache; no
// thread of the kernel's own enters XLA's process.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <xmmintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Cell : int64_t { kTanh = 0, kRelu = 1, kGru = 2, kLstm = 3 };

int64_t Gates(int64_t cell) { return cell == kGru ? 3 : cell == kLstm ? 4 : 1; }

// ---------------------------------------------------------------------------
// Small matrix products: `out[r] = bias + in[r] @ m` for R rows, `m` of shape
// (k, n), row-major. The columns are walked in groups of up to four SIMD
// vectors whose accumulators stay in registers while `k` runs.

template <typename T>
struct Vec {
  static constexpr int kLanes = 64 / sizeof(T);
  // Unaligned, and allowed to alias the buffers it reads and writes.
  typedef T type __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
};

template <typename T, int R, int NV>
inline void ProductColumns(const T* const* in, const T* m, int64_t k, int64_t n,
                           const T* bias, T* const* out, int64_t j0) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes;
  V acc[R][NV];
  for (int v = 0; v < NV; ++v) {
    V b = bias ? *reinterpret_cast<const V*>(bias + j0 + v * L) : V{};
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t q = 0; q < k; ++q) {
    const T* row = m + q * n + j0;
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = *reinterpret_cast<const V*>(row + v * L);
    for (int r = 0; r < R; ++r) {
      T a = in[r][q];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      *reinterpret_cast<V*>(out[r] + j0 + v * L) = acc[r][v];
}

template <typename T, int R>
inline void Product(const T* const* in, const T* m, int64_t k, int64_t n,
                    const T* bias, T* const* out) {
  constexpr int L = Vec<T>::kLanes;
  int64_t j0 = 0;
  for (; j0 + 4 * L <= n; j0 += 4 * L)
    ProductColumns<T, R, 4>(in, m, k, n, bias, out, j0);
  switch ((n - j0) / L) {
    case 3: ProductColumns<T, R, 3>(in, m, k, n, bias, out, j0); j0 += 3 * L; break;
    case 2: ProductColumns<T, R, 2>(in, m, k, n, bias, out, j0); j0 += 2 * L; break;
    case 1: ProductColumns<T, R, 1>(in, m, k, n, bias, out, j0); j0 += L; break;
    default: break;
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t j = j0; j < n; ++j) {
      T acc = bias ? bias[j] : T(0);
      for (int64_t q = 0; q < k; ++q) acc += in[r][q] * m[q * n + j];
      out[r][j] = acc;
    }
  }
}

// ---------------------------------------------------------------------------
// Elementwise steps of one row. `gx` (the input projection without its bias),
// `bx` (that bias) and `gh` (the recurrent projection with its bias): `gates *
// hidden` entries each; `h`, `c`: the previous state; results to `h1`, `c1`.

// float32's tanh as Eigen's and XLA's rational approximation, its sigmoid through
// it, written out so that a gate loop vectorises inline (always inlined: in the
// backward loop GCC otherwise called them, one element at a time); float64 keeps
// the math library's.
[[gnu::always_inline]] inline float Tanh(float x) {
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
[[gnu::always_inline]] inline double Tanh(double x) { return std::tanh(x); }
[[gnu::always_inline]] inline float Sigmoid(float x) {
  return 0.5f + 0.5f * Tanh(0.5f * x);
}
[[gnu::always_inline]] inline double Sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

template <typename T>
inline void StepForward(int64_t cell, int64_t H, const T* __restrict gx,
                        const T* __restrict bx, const T* __restrict gh,
                        const T* __restrict h, const T* __restrict c,
                        T* __restrict h1, T* __restrict c1) {
  switch (cell) {
    case kTanh:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) h1[j] = Tanh(gx[j] + bx[j] + gh[j]);
      break;
    case kRelu:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) h1[j] = std::max(gx[j] + bx[j] + gh[j], T(0));
      break;
    case kGru:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        T r = Sigmoid(gx[j] + bx[j] + gh[j]);
        T z = Sigmoid(gx[H + j] + bx[H + j] + gh[H + j]);
        T n = Tanh(gx[2 * H + j] + bx[2 * H + j] + r * gh[2 * H + j]);
        h1[j] = n + z * (h[j] - n);
      }
      break;
    case kLstm:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        T i = Sigmoid(gx[j] + bx[j] + gh[j]);
        T f = Sigmoid(gx[H + j] + bx[H + j] + gh[H + j]);
        T g = Tanh(gx[2 * H + j] + bx[2 * H + j] + gh[2 * H + j]);
        T o = Sigmoid(gx[3 * H + j] + bx[3 * H + j] + gh[3 * H + j]);
        T cn = f * c[j] + i * g;
        c1[j] = cn;
        h1[j] = o * Tanh(cn);
      }
      break;
  }
}

// The reverse of one step: from the cotangents `dh`, `dc` of the new state `h1`,
// the cotangents of the gate pre-activations through the input projection (`dgx`)
// and, for the GRU alone, the recurrent one (`dgh`: they differ only in its
// candidate gate, whose recurrent part is scaled by `r`; the other cells' are
// `dgx`, which is not written twice), and the part of the previous state's
// cotangent that does not pass through the recurrent product (`dh_prev`,
// `dc_prev`); the caller adds `dgh @ weight_hh`.
template <typename T>
inline void StepBackward(int64_t cell, int64_t H, const T* __restrict gx,
                         const T* __restrict bx, const T* __restrict gh,
                         const T* __restrict h, const T* __restrict c,
                         const T* __restrict h1, const T* __restrict dh,
                         const T* __restrict dc, T* __restrict dgx, T* __restrict dgh,
                         T* __restrict dh_prev, T* __restrict dc_prev) {
  switch (cell) {
    case kTanh:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        T d = dh[j] - dh[j] * h1[j] * h1[j];
        dgx[j] = d;
        dh_prev[j] = T(0);
      }
      break;
    case kRelu:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        T d = h1[j] > T(0) ? dh[j] : T(0);
        dgx[j] = d;
        dh_prev[j] = T(0);
      }
      break;
    case kGru:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        T r = Sigmoid(gx[j] + bx[j] + gh[j]);
        T z = Sigmoid(gx[H + j] + bx[H + j] + gh[H + j]);
        T hn = gh[2 * H + j];
        T n = Tanh(gx[2 * H + j] + bx[2 * H + j] + r * hn);
        T d = dh[j];
        T dn = d - d * z;
        dn = dn - dn * n * n;
        T dz = d * (h[j] - n);
        dz = dz * z - dz * z * z;
        T dr = dn * hn;
        dr = dr * r - dr * r * r;
        dgx[j] = dr;
        dgh[j] = dr;
        dgx[H + j] = dz;
        dgh[H + j] = dz;
        dgx[2 * H + j] = dn;
        dgh[2 * H + j] = dn * r;
        dh_prev[j] = d * z;
      }
      break;
    case kLstm:
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        T i = Sigmoid(gx[j] + bx[j] + gh[j]);
        T f = Sigmoid(gx[H + j] + bx[H + j] + gh[H + j]);
        T g = Tanh(gx[2 * H + j] + bx[2 * H + j] + gh[2 * H + j]);
        T o = Sigmoid(gx[3 * H + j] + bx[3 * H + j] + gh[3 * H + j]);
        T tc = Tanh(f * c[j] + i * g);
        T dcn = dc[j] + dh[j] * o * (T(1) - tc * tc);
        T d_i = dcn * g * i * (T(1) - i);
        T d_f = dcn * c[j] * f * (T(1) - f);
        T d_g = dcn * i * (T(1) - g * g);
        T d_o = dh[j] * tc * o * (T(1) - o);
        dgx[j] = d_i;
        dgx[H + j] = d_f;
        dgx[2 * H + j] = d_g;
        dgx[3 * H + j] = d_o;
        dh_prev[j] = T(0);
        dc_prev[j] = dcn * f;
      }
      break;
  }
}

// ---------------------------------------------------------------------------
// Batch axes. The outputs carry all of them; each argument has the same leading
// axes, of size 1 where `jax.vmap` left it unbatched, or none when unbatched at
// every level.

struct Batch {
  std::vector<int64_t> dims;
  int64_t size = 1;
};

ffi::Error BadArgument(const std::string& name, const std::string& what) {
  return ffi::Error::InvalidArgument("stackrnn_kernels: `" + name + "` " + what);
}

// For each row of `batch`, the row of `arg` (whose own shape is `base_rank` axes).
ffi::ErrorOr<std::vector<int64_t>> RowIndex(const Batch& batch, ffi::AnyBuffer arg,
                                            int64_t base_rank, const char* name) {
  auto dims = arg.dimensions();
  int64_t lead = static_cast<int64_t>(dims.size()) - base_rank;
  int64_t nb = static_cast<int64_t>(batch.dims.size());
  if (lead != 0 && lead != nb)
    return ffi::Unexpected(BadArgument(name, "has unexpected batch axes"));
  std::vector<int64_t> index(batch.size, 0);
  if (lead == 0) return index;
  for (int64_t a = 0; a < nb; ++a)
    if (dims[a] != 1 && dims[a] != batch.dims[a])
      return ffi::Unexpected(BadArgument(name, "has unexpected batch axes"));
  for (int64_t b = 0; b < batch.size; ++b) {
    int64_t rest = b, flat = 0, stride = 1;
    for (int64_t a = nb - 1; a >= 0; --a) {
      int64_t i = rest % batch.dims[a];
      rest /= batch.dims[a];
      flat += (dims[a] == 1 ? 0 : i) * stride;
      stride *= dims[a];
    }
    index[b] = flat;
  }
  return index;
}

Batch BatchOf(ffi::AnyBuffer out, int64_t base_rank) {
  Batch batch;
  auto dims = out.dimensions();
  batch.dims.assign(dims.begin(), dims.end() - base_rank);
  for (int64_t d : batch.dims) batch.size *= d;
  return batch;
}

// Runs `work(begin, end)` over the rows `[0, rows)`, shared between the caller
// and XLA's FFI thread pool. Parts are claimed from a shared counter, so the caller
// never waits for a task that has not started: it takes what nobody claimed, then
// waits only for parts in progress.
// Denormal floats (cotangents that decay over many steps reach them) cost each
// arithmetic instruction about a hundred cycles; XLA's own kernels flush them to
// zero, and so does every part of a loop here.
template <typename F>
void FlushingDenormals(F work, int64_t begin, int64_t end) {
  unsigned int before = _mm_getcsr();
  _mm_setcsr(before | 0x8040);  // flush to zero, denormals are zero
  work(begin, end);
  _mm_setcsr(before);
}

template <typename F>
void ParallelRows(ffi::ThreadPool& pool, int64_t rows, int64_t grain, F work) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t parts = std::min<int64_t>(threads, rows / grain);
  if (parts <= 1) {
    FlushingDenormals(work, 0, rows);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  int64_t per = (rows + parts - 1) / parts;
  auto run = [shared, parts, per, rows, work]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < parts;) {
      FlushingDenormals(work, c * per, std::min(rows, (c + 1) * per));
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

template <typename T>
const T* In(ffi::AnyBuffer b) {
  return reinterpret_cast<const T*>(b.untyped_data());
}
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& b) {
  return reinterpret_cast<T*>(b->untyped_data());
}

// The arguments both loops share, checked, with each one's row per batch row.
struct Layer {
  int64_t T = 0, H = 0, G = 0;
  Batch batch;
  std::vector<int64_t> gx, bx, w, bh, h0, c0;
};

ffi::ErrorOr<Layer> Check(int64_t cell, const Batch& batch, ffi::AnyBuffer gx,
                          ffi::AnyBuffer bx, ffi::AnyBuffer w, ffi::AnyBuffer bh,
                          ffi::AnyBuffer h0, ffi::AnyBuffer c0) {
  if (cell < kTanh || cell > kLstm)
    return ffi::Unexpected(BadArgument("cell", "must be 0, 1, 2 or 3"));
  Layer l;
  l.batch = batch;
  auto gd = gx.dimensions();
  auto wd = w.dimensions();
  if (gd.size() < 2 || wd.size() < 2)
    return ffi::Unexpected(BadArgument("gates_x", "and `weight_hh` need two axes"));
  l.T = gd[gd.size() - 2];
  l.G = gd[gd.size() - 1];
  l.H = wd[wd.size() - 1];
  if (l.G != Gates(cell) * l.H || wd[wd.size() - 2] != l.G)
    return ffi::Unexpected(BadArgument("gates_x", "and `weight_hh` disagree in width"));
  for (ffi::AnyBuffer b : {bx, w, bh, h0, c0})
    if (b.element_type() != gx.element_type())
      return ffi::Unexpected(BadArgument("gates_x", "and the others differ in dtype"));
  struct Arg {
    ffi::AnyBuffer buf;
    int64_t rank;
    const char* name;
    std::vector<int64_t>* index;
  };
  bool lstm = cell == kLstm;
  Arg args[] = {{gx, 2, "gates_x", &l.gx},   {bx, 1, "bias_ih", &l.bx},
                {w, 2, "weight_hh", &l.w},   {bh, 1, "bias_hh", &l.bh},
                {h0, 1, "h0", &l.h0},        {c0, 1, "c0", &l.c0}};
  for (Arg& a : args) {
    if (!lstm && a.index == &l.c0) continue;
    auto index = RowIndex(batch, a.buf, a.rank, a.name);
    if (index.has_error()) return ffi::Unexpected(index.error());
    *a.index = std::move(*index);
  }
  if (!lstm) l.c0.assign(batch.size, 0);
  return l;
}

// weight_hh transposed once per distinct weight, so that a step's product
// `h @ weight_hh.T` reads it by rows.
template <typename T>
std::vector<T> Transposed(const Layer& l, ffi::AnyBuffer w) {
  const int64_t G = l.G, H = l.H;
  int64_t nw = 1 + *std::max_element(l.w.begin(), l.w.end());
  std::vector<T> wt(nw * G * H);
  for (int64_t q = 0; q < nw; ++q)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < H; ++k)
        wt[q * G * H + k * G + g] = In<T>(w)[q * G * H + g * H + k];
  return wt;
}

// Rows sharing one weight are processed this many at a time.
constexpr int kRows = 4;

// Forward: gates_x (*B, T, G) without its bias, bias_ih (G), weight_hh (G, H),
// bias_hh (G), h0 (H), c0 (H) -> hs (*B, T, H), cs (*B, T, H) (each argument's
// leading axes as `RowIndex` reads them). Without an LSTM, `c0` and `cs` are empty.
// A step's recurrent projection lives in scratch: the backward loop recomputes it,
// which cost less than writing and reading it back for all steps.
template <typename T>
ffi::Error Forward(ffi::ThreadPool& pool, int64_t cell, bool reverse,
                   ffi::AnyBuffer gx, ffi::AnyBuffer bx, ffi::AnyBuffer w,
                   ffi::AnyBuffer bh, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                   ffi::Result<ffi::AnyBuffer>& hs, ffi::Result<ffi::AnyBuffer>& cs) {
  auto checked = Check(cell, BatchOf(*hs, 2), gx, bx, w, bh, h0, c0);
  if (checked.has_error()) return checked.error();
  const Layer& l = *checked;
  const int64_t Tn = l.T, H = l.H, G = l.G;
  const bool lstm = cell == kLstm;
  std::vector<T> wt = Transposed<T>(l, w);
  const T *gxp = In<T>(gx), *bxp = In<T>(bx), *bhp = In<T>(bh);
  const T *h0p = In<T>(h0), *c0p = lstm ? In<T>(c0) : nullptr;
  T* hsp = Out<T>(hs);
  T* csp = lstm ? Out<T>(cs) : nullptr;

  auto rows = [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(kRows * G);
    for (int64_t b = begin; b < end;) {
      int n = 1;
      while (n < kRows && b + n < end && l.w[b + n] == l.w[b] && l.bh[b + n] == l.bh[b])
        ++n;
      const T* m = wt.data() + l.w[b] * G * H;
      const T* bias = bhp + l.bh[b] * G;
      const T *hprev[kRows], *cprev[kRows];
      T* ghrow[kRows];
      for (int r = 0; r < n; ++r) {
        hprev[r] = h0p + l.h0[b + r] * H;
        cprev[r] = lstm ? c0p + l.c0[b + r] * H : nullptr;
      }
      for (int64_t i = 0; i < Tn; ++i) {
        int64_t t = reverse ? Tn - 1 - i : i;
        for (int r = 0; r < n; ++r) ghrow[r] = scratch.data() + r * G;
        if (n == kRows)
          Product<T, kRows>(hprev, m, H, G, bias, ghrow);
        else
          for (int r = 0; r < n; ++r) Product<T, 1>(&hprev[r], m, H, G, bias, &ghrow[r]);
        for (int r = 0; r < n; ++r) {
          int64_t row = (b + r) * Tn + t;
          T* h1 = hsp + row * H;
          T* c1 = lstm ? csp + row * H : nullptr;
          StepForward<T>(cell, H, gxp + (l.gx[b + r] * Tn + t) * G, bxp + l.bx[b + r] * G,
                         ghrow[r], hprev[r], cprev[r], h1, c1);
          hprev[r] = h1;
          cprev[r] = c1;
        }
      }
      b += n;
    }
  };
  ParallelRows(pool, l.batch.size, 16, rows);
  return ffi::Error::Success();
}

// Backward: the forward's arguments, `hs`, `cs` (the forward's results) and their
// cotangents `dhs`, `dcs` -> d gates_x, d gates_h (*B, T, G)
// and d h0, d c0 (*B, H). Without an LSTM, `cs`, `dcs` and `d c0` are empty; without
// a GRU, so is `d gates_h`, which equals `d gates_x` there.
template <typename T>
ffi::Error Backward(ffi::ThreadPool& pool, int64_t cell, bool reverse,
                    ffi::AnyBuffer gx, ffi::AnyBuffer bx, ffi::AnyBuffer w,
                    ffi::AnyBuffer bh, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                    ffi::AnyBuffer hs, ffi::AnyBuffer cs,
                    ffi::AnyBuffer dhs, ffi::AnyBuffer dcs,
                    ffi::Result<ffi::AnyBuffer>& dgx, ffi::Result<ffi::AnyBuffer>& dgh,
                    ffi::Result<ffi::AnyBuffer>& dh0, ffi::Result<ffi::AnyBuffer>& dc0) {
  Batch batch = BatchOf(*dgx, 2);
  auto checked = Check(cell, batch, gx, bx, w, bh, h0, c0);
  if (checked.has_error()) return checked.error();
  const Layer& l = *checked;
  const int64_t Tn = l.T, H = l.H, G = l.G;
  const bool lstm = cell == kLstm;
  std::vector<int64_t> hs_i, cs_i, dhs_i, dcs_i;
  struct Arg {
    ffi::AnyBuffer buf;
    const char* name;
    std::vector<int64_t>* index;
  };
  Arg args[] = {{hs, "hs", &hs_i},
                {cs, "cs", &cs_i},
                {dhs, "dhs", &dhs_i},
                {dcs, "dcs", &dcs_i}};
  for (Arg& a : args) {
    if (!lstm && (a.index == &cs_i || a.index == &dcs_i)) continue;
    auto index = RowIndex(batch, a.buf, 2, a.name);
    if (index.has_error()) return index.error();
    *a.index = std::move(*index);
  }
  std::vector<T> wt = Transposed<T>(l, w);
  const T *gxp = In<T>(gx), *bxp = In<T>(bx), *wp = In<T>(w), *bhp = In<T>(bh);
  const T *h0p = In<T>(h0), *c0p = lstm ? In<T>(c0) : nullptr;
  const T *hsp = In<T>(hs), *csp = lstm ? In<T>(cs) : nullptr;
  const T *dhsp = In<T>(dhs), *dcsp = lstm ? In<T>(dcs) : nullptr;
  const bool gru = cell == kGru;
  T *dgxp = Out<T>(dgx), *dghp = gru ? Out<T>(dgh) : nullptr, *dh0p = Out<T>(dh0);
  T* dc0p = lstm ? Out<T>(dc0) : nullptr;

  auto rows = [&](int64_t begin, int64_t end) {
    // Per block of rows: the carried cotangents, the step's, and the product's;
    // the recomputed recurrent projections.
    std::vector<T> buf(kRows * 5 * H, T(0)), gh(kRows * G);
    T* carry_h = buf.data();
    T* carry_c = carry_h + kRows * H;
    T* dh = carry_c + kRows * H;
    T* dc = dh + kRows * H;
    T* from_w = dc + kRows * H;
    for (int64_t b = begin; b < end;) {
      int n = 1;
      while (n < kRows && b + n < end && l.w[b + n] == l.w[b] && l.bh[b + n] == l.bh[b])
        ++n;
      const T* m = wp + l.w[b] * G * H;  // (G, H): dh_prev += dgh @ weight_hh
      const T* mt = wt.data() + l.w[b] * G * H;
      const T* bias = bhp + l.bh[b] * G;
      std::fill(buf.begin(), buf.end(), T(0));
      for (int64_t i = 0; i < Tn; ++i) {
        int64_t t = reverse ? i : Tn - 1 - i;  // the forward loop's order, reversed
        bool first = reverse ? t == Tn - 1 : t == 0;
        int64_t tp = reverse ? t + 1 : t - 1;
        const T *dghrow[kRows], *hprev[kRows];
        T *fw[kRows], *ghrow[kRows];
        for (int r = 0; r < n; ++r) {
          int64_t br = b + r;
          hprev[r] = first ? h0p + l.h0[br] * H : hsp + (hs_i[br] * Tn + tp) * H;
          ghrow[r] = gh.data() + r * G;
        }
        if (n == kRows)
          Product<T, kRows>(hprev, mt, H, G, bias, ghrow);
        else
          for (int r = 0; r < n; ++r) Product<T, 1>(&hprev[r], mt, H, G, bias, &ghrow[r]);
        for (int r = 0; r < n; ++r) {
          int64_t br = b + r, row = br * Tn + t;
          const T* hp = hprev[r];
          const T* cp = nullptr;
          if (lstm) cp = first ? c0p + l.c0[br] * H : csp + (cs_i[br] * Tn + tp) * H;
          T* dhr = dh + r * H;
          T* dcr = dc + r * H;
          const T* dhs_row = dhsp + (dhs_i[br] * Tn + t) * H;
          for (int64_t j = 0; j < H; ++j) dhr[j] = dhs_row[j] + carry_h[r * H + j];
          if (lstm) {
            const T* dcs_row = dcsp + (dcs_i[br] * Tn + t) * H;
            for (int64_t j = 0; j < H; ++j) dcr[j] = dcs_row[j] + carry_c[r * H + j];
          }
          StepBackward<T>(cell, H, gxp + (l.gx[br] * Tn + t) * G, bxp + l.bx[br] * G,
                          ghrow[r], hp, cp,
                          hsp + (hs_i[br] * Tn + t) * H, dhr, dcr, dgxp + row * G,
                          gru ? dghp + row * G : nullptr, carry_h + r * H,
                          carry_c + r * H);
          dghrow[r] = (gru ? dghp : dgxp) + row * G;
          fw[r] = from_w + r * H;
        }
        if (n == kRows)
          Product<T, kRows>(dghrow, m, G, H, nullptr, fw);
        else
          for (int r = 0; r < n; ++r) Product<T, 1>(&dghrow[r], m, G, H, nullptr, &fw[r]);
        for (int r = 0; r < n; ++r)
          for (int64_t j = 0; j < H; ++j) carry_h[r * H + j] += fw[r][j];
      }
      for (int r = 0; r < n; ++r) {
        std::memcpy(dh0p + (b + r) * H, carry_h + r * H, H * sizeof(T));
        if (lstm) std::memcpy(dc0p + (b + r) * H, carry_c + r * H, H * sizeof(T));
      }
      b += n;
    }
  };
  ParallelRows(pool, batch.size, 16, rows);
  return ffi::Error::Success();
}

ffi::Error ForwardAny(ffi::ThreadPool pool, int64_t cell, bool reverse,
                      ffi::AnyBuffer gx, ffi::AnyBuffer bx, ffi::AnyBuffer w,
                      ffi::AnyBuffer bh, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                      ffi::Result<ffi::AnyBuffer> hs, ffi::Result<ffi::AnyBuffer> cs) {
  switch (gx.element_type()) {
    case ffi::F32:
      return Forward<float>(pool, cell, reverse, gx, bx, w, bh, h0, c0, hs, cs);
    case ffi::F64:
      return Forward<double>(pool, cell, reverse, gx, bx, w, bh, h0, c0, hs, cs);
    default:
      return BadArgument("gates_x", "must be float32 or float64");
  }
}

ffi::Error BackwardAny(ffi::ThreadPool pool, int64_t cell, bool reverse,
                       ffi::AnyBuffer gx, ffi::AnyBuffer bx, ffi::AnyBuffer w,
                       ffi::AnyBuffer bh, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                       ffi::AnyBuffer hs, ffi::AnyBuffer cs,
                       ffi::AnyBuffer dhs, ffi::AnyBuffer dcs,
                       ffi::Result<ffi::AnyBuffer> dgx, ffi::Result<ffi::AnyBuffer> dgh,
                       ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::AnyBuffer> dc0) {
  switch (gx.element_type()) {
    case ffi::F32:
      return Backward<float>(pool, cell, reverse, gx, bx, w, bh, h0, c0, hs, cs, dhs, dcs,
                             dgx, dgh, dh0, dc0);
    case ffi::F64:
      return Backward<double>(pool, cell, reverse, gx, bx, w, bh, h0, c0, hs, cs, dhs,
                              dcs, dgx, dgh, dh0, dc0);
    default:
      return BadArgument("gates_x", "must be float32 or float64");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StackrnnForward, ForwardAny,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse")
                                  .Arg<ffi::AnyBuffer>()  // gates_x
                                  .Arg<ffi::AnyBuffer>()  // bias_ih
                                  .Arg<ffi::AnyBuffer>()  // weight_hh
                                  .Arg<ffi::AnyBuffer>()  // bias_hh
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // c0
                                  .Ret<ffi::AnyBuffer>()  // hs
                                  .Ret<ffi::AnyBuffer>()  // cs
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(StackrnnBackward, BackwardAny,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse")
                                  .Arg<ffi::AnyBuffer>()  // gates_x
                                  .Arg<ffi::AnyBuffer>()  // bias_ih
                                  .Arg<ffi::AnyBuffer>()  // weight_hh
                                  .Arg<ffi::AnyBuffer>()  // bias_hh
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // c0
                                  .Arg<ffi::AnyBuffer>()  // hs
                                  .Arg<ffi::AnyBuffer>()  // cs
                                  .Arg<ffi::AnyBuffer>()  // dhs
                                  .Arg<ffi::AnyBuffer>()  // dcs
                                  .Ret<ffi::AnyBuffer>()  // d gates_x
                                  .Ret<ffi::AnyBuffer>()  // d gates_h
                                  .Ret<ffi::AnyBuffer>()  // d h0
                                  .Ret<ffi::AnyBuffer>()  // d c0
);
