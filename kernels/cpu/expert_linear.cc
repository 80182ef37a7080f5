// Expert-routed projection: x [N, in] in routed order (language rows first), y = x[:L] @ Wl^T and
// y[L:] = x[L:] @ Wv^T + bv, or, with a residual r [N, out] instead of the bias, y = r + the same products (the
// decoder's residual add, fused so that it costs no pass of its own), as two GEMM calls on contiguous row ranges of x and y. Weights are either float32 in
// [out, in] layout, read transposed by the GEMM (nothing is copied), or panels prepacked at load time in float32,
// bfloat16 or float16 (gemm.h), read by the panel GEMM in the call's math. For [out, in] weights, which GEMM is a
// per-call choice (the tuned table's):
//   0: ours (gemm.cc), 1: an OpenBLAS SGEMM (numpy's, by default), 2: oneDNN's dnnl_sgemm (the libdnnl that
//   ships inside MindSpore, so always there). The libraries are opened at run time, so this one links to neither.
// Library GEMMs run single-threaded; threads here split the output columns (weight rows) between them, so no
// BLAS thread pool competes with MindSpore's.

#include <dlfcn.h>

#include "common.h"
#include "gemm.h"
#include "gemm_amx.h"

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

// What the products are added to: nothing, the vision expert's bias [out] (vision rows only), or a residual
// [N, out] (every row).
enum Addend : int32_t { kNoAddend = 0, kVisionBias = 1, kResidual = 2 };

// The config tensor: [num_language, addend, threads, gemm, k_block, n_block] and, where present (else 0),
// [bf16_dot, portable, tile_rows, amx, widen_rows] for panels (gemm.h PanelGemm), then parallel_min_work: the
// fewest tokens x weights a call needs to take cfg.threads threads (a helper can start late on a loaded core, and
// the call then waits for it; absent: 0, every call takes them), then prefetch_rows (gemm.h PanelGemm; absent: 0).
struct Config {
  int64_t language;
  Addend addend;
  int threads;
  GemmKind kind;
  int64_t k_block, n_block;
  bool bf16_dot, portable;
  int tile_rows;
  bool amx;
  int widen_rows;
  int64_t parallel_min_work;
  int prefetch_rows;
};

Config read_config(const int32_t* c, int64_t count) {
  auto at = [&](int64_t i) { return i < count ? c[i] : 0; };
  return {c[0], static_cast<Addend>(c[1]), std::max(1, c[2]), static_cast<GemmKind>(c[3]), c[4], c[5], at(6) != 0, at(7) != 0, at(8),
          at(9) != 0, at(10), at(11), at(12)};
}

struct Weights {
  bool panels;
  PanelDtype dtype;
  int64_t out;
};

// The panel dtype of input i; int8 panels by their rank: k-major (3) or in k quads (4).
bool weight_dtype(const Args& a, int i, PanelDtype* dtype) {
  if (a.is_f32(i)) *dtype = PanelDtype::kF32;
  else if (a.is(i, "bfloat16")) *dtype = PanelDtype::kBf16;
  else if (a.is(i, "float16")) *dtype = PanelDtype::kF16;
  else if (a.is(i, "int8")) *dtype = a.rank(i) == 4 ? PanelDtype::kI8Quads : PanelDtype::kI8;
  else return false;
  return true;
}

// The k groups a panel dtype stores: 2 (bf16 pairs), 4 (int8 quads) or 1 (k-major).
int64_t k_group(PanelDtype dtype) { return dtype == PanelDtype::kBf16 ? 2 : dtype == PanelDtype::kI8Quads ? 4 : 1; }

// Both experts' weights alike: float32 [out, in], or panels of their dtype's layout over `in`.
Status check_weights(const Args& a, int64_t in, Weights* w) {
  PanelDtype language, vision;
  if (!weight_dtype(a, 1, &language) || !weight_dtype(a, 2, &vision) || language != vision) return kBadDtype;
  const int rank = a.rank(1);
  if (a.rank(2) != rank) return kBadShape;
  for (int d = 0; d < rank; ++d)
    if (a.dim(1, d) != a.dim(2, d)) return kBadShape;
  *w = {rank != 2, language, rank == 2 ? a.dim(1, 0) : a.dim(1, 0) * kPackedPanel};
  if (rank == 2) return language != PanelDtype::kF32 ? kBadDtype : a.dim(1, 1) == in ? kOk : kBadShape;
  const int64_t group = k_group(language);
  if (rank != (group > 1 ? 4 : 3) || a.dim(1, 1) != (in + group - 1) / group || a.dim(1, 2) != kPackedPanel ||
      (group > 1 && a.dim(1, 3) != group))
    return kBadShape;
  return kOk;
}

// Int8 panels come with their per-column scales (language, vision), and int8 quads with their per-column offsets;
// else nullptr.
struct Scales {
  const float* language = nullptr;
  const float* vision = nullptr;
  const int32_t* language_offsets = nullptr;
  const int32_t* vision_offsets = nullptr;
};

// y = the routed projection, on up to cfg.threads threads: each owns ranges of output panels of both row ranges.

void project_experts(const Config& cfg, const Weights& w, int64_t n, int64_t in, const float* x, const void* wl,
                     const void* wv, const float* addend, float* y, Scales scales) {
  const int64_t out = w.out, language = cfg.language, vision = n - language;
  const int workers = n * out * in >= cfg.parallel_min_work ? cfg.threads : 1;
  const PanelMath math = w.dtype == PanelDtype::kI8Quads ? PanelMath::kInt8Dot
                         : cfg.bf16_dot                  ? PanelMath::kBf16Dot
                                                         : PanelMath::kFloat32;
  const PanelGemm g{w.dtype, math, cfg.portable, cfg.k_block, cfg.tile_rows, cfg.amx, cfg.widen_rows,
                    cfg.prefetch_rows};
  thread_local ActivationStorage storage;  // kept between calls: the rounded activations of the largest call
  const Activations xs = w.panels ? prepare_activations(g, x, n, in, storage, workers) : Activations{x, in, 4};
  auto project = [&](int64_t rows, int64_t row0, const void* wt, const float* scale, const int32_t* offsets,
                     float* ys, bool accumulate, int64_t p0, int64_t p1) {
    if (w.panels)
      return gemm_panels(g, rows, out, p0, p1, in, xs.rows_from(row0), wt, ys, accumulate, scale, offsets);
    gemm_columns(cfg.kind, rows, out, p0 * kGemmColumnAlign, std::min(out, p1 * kGemmColumnAlign), in,
                 x + row0 * in, static_cast<const float*>(wt), ys, accumulate, cfg.k_block, cfg.n_block);
  };
  // Rows [r0, r1)'s columns [c0, c1) of y set to what the products are then added to.
  auto start_from = [&](const float* rows, int64_t stride, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    for (int64_t i = r0; i < r1; ++i) std::memcpy(y + i * out + c0, rows + i * stride + c0, (c1 - c0) * sizeof(float));
  };
  const bool residual = cfg.addend == kResidual;
  parallel_ranges((out + kGemmColumnAlign - 1) / kGemmColumnAlign, workers, [&](int64_t p0, int64_t p1) {
    const int64_t c0 = p0 * kGemmColumnAlign, c1 = std::min(out, p1 * kGemmColumnAlign);
    if (residual) start_from(addend, out, 0, n, c0, c1);
    if (language > 0) project(language, 0, wl, scales.language, scales.language_offsets, y, residual, p0, p1);
    if (vision > 0) {
      if (cfg.addend == kVisionBias) start_from(addend, 0, language, n, c0, c1);
      project(vision, language, wv, scales.vision, scales.vision_offsets, y + language * out,
              cfg.addend != kNoAddend, p0, p1);
    }
  });
}

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

// 1 when the panel GEMM's bf16 dot runs vdpbf16ps on this CPU, 0 when it takes the fallback.
extern "C" int cogvlm2_has_bf16_dot() { return cogvlm2::cpu_has_bf16_dot() ? 1 : 0; }

// 1 when the panel GEMM's bf16 and int8 dot products can run on AMX tiles here (gemm_amx.h).
extern "C" int cogvlm2_has_amx() { return cogvlm2::cpu_has_amx() ? 1 : 0; }

namespace cogvlm2 {
namespace {

// What an entry point's weights are: float (f32, bf16, f16 panels or f32 [out, in]), int8 k-major panels with
// their scales (w8a16), or int8 k quads with their scales and offsets (w8a8).
enum class Quantized { kNone, kWeights, kWeightsAndActivations };

// The checks and the call shared by the entry points: x at 0, wl and wv at 1 and 2, then (int8) their scales and
// (int8 quads) their offsets, then the addend, the config and the output y.
Status expert_linear(const Args& a, Quantized quantized) {
  const bool int8 = quantized != Quantized::kNone, quads = quantized == Quantized::kWeightsAndActivations;
  const int addend_i = quads ? 7 : int8 ? 5 : 3, config_i = addend_i + 1, y_i = addend_i + 2;
  if (a.nparam != y_i + 1) return kBadArity;
  for (int i : {0, addend_i, y_i})
    if (!a.is_f32(i)) return kBadDtype;
  if (!a.is_i32(config_i) || a.numel(config_i) < 6) return kBadDtype;
  if (a.rank(0) != 2) return kBadShape;
  const int64_t n = a.dim(0, 0), in = a.dim(0, 1);
  Weights w;
  if (const Status status = check_weights(a, in, &w)) return status;
  if ((w.dtype == PanelDtype::kI8) != (int8 && !quads) || (w.dtype == PanelDtype::kI8Quads) != quads)
    return kBadDtype;
  Scales scales;
  if (int8) {
    if (!a.is_f32(3) || !a.is_f32(4)) return kBadDtype;
    if (a.numel(3) != w.out || a.numel(4) != w.out) return kBadShape;
    scales.language = a.data<float>(3);
    scales.vision = a.data<float>(4);
  }
  if (quads) {
    if (!a.is_i32(5) || !a.is_i32(6)) return kBadDtype;
    if (a.numel(5) != w.out || a.numel(6) != w.out) return kBadShape;
    scales.language_offsets = a.data<int32_t>(5);
    scales.vision_offsets = a.data<int32_t>(6);
  }
  const Config cfg = read_config(a.data<int32_t>(config_i), a.numel(config_i));
  if (cfg.bf16_dot && w.dtype != PanelDtype::kBf16 && w.dtype != PanelDtype::kI8) return kBadDtype;
  const int64_t addend_numel = cfg.addend == kVisionBias   ? w.out
                               : cfg.addend == kResidual ? n * w.out
                                                         : a.numel(addend_i);
  if (cfg.language < 0 || cfg.language > n || cfg.addend < kNoAddend || cfg.addend > kResidual ||
      a.numel(addend_i) != addend_numel || a.numel(y_i) != n * w.out)
    return kBadShape;
  if (!w.panels && !available(cfg.kind)) return kNoBlas;
  project_experts(cfg, w, n, in, a.data<float>(0), a.params[1], a.params[2], a.data<float>(addend_i),
                  a.data<float>(y_i), scales);
  return kOk;
}

}  // namespace
}  // namespace cogvlm2

// inputs: x [N,in] f32; wl and wv both f32 [out,in] or both panels (gemm.h) of one dtype: f32 or f16
//         [out/32,in,32], bf16 [out/32,ceil(in/2),32,2]; addend (f32): the bias [out], the residual [N,out], or
//         [1] for none; config (i32, Config above):
//         gemm and n_block apply to [out,in] weights only, bf16_dot to bf16 panels only (else kBadDtype).
// output: y [N,out] f32
COGVLM2_AOT(ExpertLinear) {
  return cogvlm2::expert_linear(cogvlm2::Args{nparam, params, ndims, shapes, dtypes}, cogvlm2::Quantized::kNone);
}

// ExpertLinear over int8 panels [out/32,in,32] (w8a16: each weight q * its output column's scale, dequantized in
// registers). inputs: x, wl, wv, then the scales sl [out] and sv [out] (f32), then addend and config as above.
// output: y [N,out] f32
COGVLM2_AOT(ExpertLinearInt8) {
  return cogvlm2::expert_linear(cogvlm2::Args{nparam, params, ndims, shapes, dtypes}, cogvlm2::Quantized::kWeights);
}

// ExpertLinear over int8 panels in k quads [out/32,ceil(in/4),32,4] with per-token int8 activations (w8a8, gemm.h
// kInt8Dot: quantized inside the call, integer products by vpdpbusd or its portable twin; config's portable picks
// the twin, its bf16_dot and k_block are ignored). inputs: x, wl, wv, the scales sl and sv [out] (f32), the offsets
// ol and ov [out] (i32, 128 * each output column's sum of int8 weights), then addend and config as above.
// output: y [N,out] f32
COGVLM2_AOT(ExpertLinearInt8Dot) {
  return cogvlm2::expert_linear(cogvlm2::Args{nparam, params, ndims, shapes, dtypes},
                                cogvlm2::Quantized::kWeightsAndActivations);
}

// 1 when the int8-dot panel GEMM runs vpdpbusd on this CPU, 0 when it takes the fallback.
extern "C" int cogvlm2_has_int8_dot() { return cogvlm2::cpu_has_int8_dot() ? 1 : 0; }
