// Expert-routed projection: x [N, in] in routed order (language rows first), y = x[:L] @ Wl^T and
// y[L:] = x[L:] @ Wv^T + bv, as two GEMM calls on contiguous row ranges of x and y, weights in [out, in] layout
// read transposed by the GEMM (nothing is copied). Which GEMM is a per-call choice (the tuned table's):
//   0: ours (gemm.cc), 1: an OpenBLAS SGEMM (numpy's, by default), 2: oneDNN's dnnl_sgemm (the libdnnl that
//   ships inside MindSpore, so always there). The libraries are opened at run time, so this one links to neither.
// Library GEMMs run single-threaded; threads here split the output columns (weight rows) between them, so no
// BLAS thread pool competes with MindSpore's.

#include <dlfcn.h>

#include "common.h"
#include "gemm.h"

namespace cogvlm2 {
namespace {

enum GemmKind { kOwn = 0, kOpenBlas = 1, kOneDnn = 2 };
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                         int32_t, float, float*, int32_t);
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                         int64_t, float, float*, int64_t);
using DnnlSgemm = int (*)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                          int64_t, float, float*, int64_t);
using SetThreads = void (*)(int);

struct Libraries {
  Sgemm32 sgemm32 = nullptr;
  Sgemm64 sgemm64 = nullptr;
  DnnlSgemm dnnl = nullptr;
};

Libraries libs;

// y[m, cols] (ldy) = x[m, k] @ w[cols, k]^T (+ y when accumulate), one library call.
void library_gemm(GemmKind kind, int64_t m, int64_t cols, int64_t k, const float* x, const float* w, float* y,
                  int64_t ldy, bool accumulate) {
  const float beta = accumulate ? 1.f : 0.f;
  if (kind == kOneDnn) {
    libs.dnnl('N', 'T', m, cols, k, 1.f, x, k, w, k, beta, y, ldy);
  } else if (libs.sgemm64) {
    libs.sgemm64(kRowMajor, kNoTrans, kTrans, m, cols, k, 1.f, x, k, w, k, beta, y, ldy);
  } else {
    libs.sgemm32(kRowMajor, kNoTrans, kTrans, static_cast<int32_t>(m), static_cast<int32_t>(cols),
                 static_cast<int32_t>(k), 1.f, x, static_cast<int32_t>(k), w, static_cast<int32_t>(k), beta, y,
                 static_cast<int32_t>(ldy));
  }
}

bool available(GemmKind kind) {
  return kind == kOwn || (kind == kOneDnn && libs.dnnl) || (kind == kOpenBlas && (libs.sgemm32 || libs.sgemm64));
}

// Columns [c0, c1) of y[m, n] = x @ w^T (+ y when accumulate), on the calling thread.
void gemm_columns(GemmKind kind, int64_t m, int64_t n, int64_t c0, int64_t c1, int64_t k, const float* x,
                  const float* w, float* y, bool accumulate, int64_t k_block, int64_t n_block) {
  if (kind == kOwn) return gemm_nt_columns(m, n, c0, c1, k, x, w, y, accumulate, k_block, n_block);
  library_gemm(kind, m, c1 - c0, k, x, w + c0 * k, y + c0, n, accumulate);
}

void* open_library(const char* path) { return dlopen(path, RTLD_NOW | RTLD_LOCAL); }

}  // namespace
}  // namespace cogvlm2

// Loads an SGEMM from the OpenBLAS at `path`: the ILP64 symbols of numpy's (cblas_sgemm64_), scipy's
// (scipy_cblas_sgemm) or a plain CBLAS (cblas_sgemm); pins its own threads to 1. Returns 0 on success.
extern "C" int cogvlm2_load_blas(const char* path) {
  using namespace cogvlm2;
  void* handle = open_library(path);
  if (!handle) return 1;
  auto sgemm64 = reinterpret_cast<Sgemm64>(dlsym(handle, "cblas_sgemm64_"));
  auto sgemm32 = reinterpret_cast<Sgemm32>(dlsym(handle, "scipy_cblas_sgemm"));
  if (!sgemm32) sgemm32 = reinterpret_cast<Sgemm32>(dlsym(handle, "cblas_sgemm"));
  if (!sgemm64 && !sgemm32) return 2;
  for (const char* name : {"openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"})
    if (auto set_threads = reinterpret_cast<SetThreads>(dlsym(handle, name))) {
      set_threads(1);
      break;
    }
  libs.sgemm64 = sgemm64;
  libs.sgemm32 = sgemm64 ? nullptr : sgemm32;
  return 0;
}

// Loads dnnl_sgemm from the oneDNN at `path` (MindSpore's lib/libdnnl.so.3). Returns 0 on success.
extern "C" int cogvlm2_load_onednn(const char* path) {
  using namespace cogvlm2;
  void* handle = open_library(path);
  if (!handle) return 1;
  libs.dnnl = reinterpret_cast<DnnlSgemm>(dlsym(handle, "dnnl_sgemm"));
  return libs.dnnl ? 0 : 2;
}

// inputs: x [N,in], wl and wv [out,in] or both prepacked [out/32,in,32] (gemm.h; then gemm and n_block are unused:
//         the prepacked GEMM is the only one that reads that layout), bv [out] or [1] (f32),
//         config [num_language, has_bias, threads, gemm (0 ours, 1 OpenBLAS, 2 oneDNN), k_block, n_block] (i32)
// output: y [N,out] f32
COGVLM2_AOT(ExpertLinear) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  if (nparam != 6) return kBadArity;
  for (int i : {0, 1, 2, 3, 5})
    if (!a.is_f32(i)) return kBadDtype;
  if (!a.is_i32(4) || a.numel(4) < 6) return kBadDtype;
  const bool prepacked = a.rank(1) == 3;
  if (a.rank(0) != 2 || a.rank(1) != a.rank(2) || (a.rank(1) != 2 && !prepacked)) return kBadShape;
  if (prepacked && (a.dim(1, 2) != kPackedPanel || a.dim(2, 2) != kPackedPanel || a.dim(1, 0) != a.dim(2, 0)))
    return kBadShape;
  const int64_t n = a.dim(0, 0), in = a.dim(0, 1);
  const int64_t out = prepacked ? a.dim(1, 0) * kPackedPanel : a.dim(1, 0);
  const int32_t* cfg = a.data<int32_t>(4);
  const int64_t language = cfg[0];
  const bool has_bias = cfg[1] != 0;
  const int threads = std::max(1, cfg[2]);
  const GemmKind kind = static_cast<GemmKind>(cfg[3]);
  if (a.dim(1, 1) != in || a.dim(2, 1) != in || (!prepacked && a.dim(2, 0) != out) || language < 0 ||
      language > n || (has_bias && a.numel(3) != out) || a.numel(5) != n * out)
    return kBadShape;
  if (!prepacked && !available(kind)) return kNoBlas;
  const float* x = a.data<float>(0);
  const float* wl = a.data<float>(1);
  const float* wv = a.data<float>(2);
  const float* bias = a.data<float>(3);
  float* y = a.data<float>(5);
  const int64_t vision = n - language;
  // One parallel region for both experts: each thread owns ranges of output panels of both row ranges.
  const int64_t panels = (out + kGemmColumnAlign - 1) / kGemmColumnAlign;
  const int workers = n * out * in >= (1 << 20) ? threads : 1;
  auto project = [&](int64_t rows, const float* xs, const float* w, float* ys, bool accumulate, int64_t p0,
                     int64_t p1) {
    if (prepacked) return gemm_prepacked_panels(rows, out, p0, p1, in, xs, w, ys, accumulate, cfg[4]);
    gemm_columns(kind, rows, out, p0 * kGemmColumnAlign, std::min(out, p1 * kGemmColumnAlign), in, xs, w, ys,
                 accumulate, cfg[4], cfg[5]);
  };
  parallel_ranges(panels, workers, [&](int64_t p0, int64_t p1) {
    if (language > 0) project(language, x, wl, y, false, p0, p1);
    if (vision > 0) {
      const int64_t c0 = p0 * kGemmColumnAlign, c1 = std::min(out, p1 * kGemmColumnAlign);
      float* yv = y + language * out;
      if (has_bias)
        for (int64_t i = 0; i < vision; ++i) std::memcpy(yv + i * out + c0, bias + c0, (c1 - c0) * sizeof(float));
      project(vision, x + language * in, wv, yv, has_bias, p0, p1);
    }
  });
  return kOk;
}
