// The KV cache's element types and its write. A cache holds float32, bfloat16, float16 or int8 (the cache
// tensor's dtype); 16-bit caches are rounded to nearest even on write and widened to fp32 on read, so all the
// attention arithmetic stays fp32. An int8 cache row of one KV head is [d + 4] bytes: the head's d values quantized
// symmetrically (round to nearest even, scale = max |x| / 127, 1 for an all-zero row), then that fp32 scale, so
// the scale is written with its entry and read with it; reading gives q * scale in fp32.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cogvlm2 {

struct Bf16 {
  uint16_t bits;
};
struct Fp16 {
  uint16_t bits;
};
struct I8 {
  int8_t value;
};

enum class CacheType { kF32, kBF16, kF16, kI8 };

constexpr int64_t kI8ScaleBytes = sizeof(float);

// Cache elements per KV head row.
inline int64_t head_elems(CacheType type, int64_t d) { return type == CacheType::kI8 ? d + kI8ScaleBytes : d; }
template <typename T>
constexpr int64_t head_elems(int64_t d) {
  return std::is_same_v<T, I8> ? d + kI8ScaleBytes : d;
}

// The cache element type of parameter i, from its dtype name; false for any other dtype.
inline bool cache_type(const Args& a, int i, CacheType& type) {
  if (a.is_f32(i)) type = CacheType::kF32;
  else if (a.is_bf16(i)) type = CacheType::kBF16;
  else if (a.is_f16(i)) type = CacheType::kF16;
  else if (a.is(i, "int8")) type = CacheType::kI8;
  else return false;
  return true;
}

template <typename T>
struct Tag {
  using type = T;
};

// body(Tag<T>{}) for the element type T of `type`.
template <typename Body>
auto with_cache_type(CacheType type, Body body) {
  switch (type) {
    case CacheType::kBF16: return body(Tag<Bf16>{});
    case CacheType::kF16: return body(Tag<Fp16>{});
    case CacheType::kI8: return body(Tag<I8>{});
    default: return body(Tag<float>{});
  }
}

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// bfloat16 is fp32's upper half: round to nearest even on the dropped half. A NaN stays a NaN (quieted: adding
// the rounding bias could carry a small payload into an infinity).
inline uint16_t bf16_bits(float x) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x0040u);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline float bf16_rounded(float x) { return bits_float(static_cast<uint32_t>(bf16_bits(x)) << 16); }

// IEEE binary16 without F16C: the conversions the hardware does, for builds without it.
namespace portable {

inline uint16_t fp16_bits(float x) {
  const uint32_t b = float_bits(x), sign = (b >> 16) & 0x8000u, mag = b & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((mag >> 13) & 0x3ffu));  // NaN, quieted
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (mag < 0x38800000u) {
    // below 2^-14 the result is subnormal: adding 0.5 puts |x| / 2^-24 in the low mantissa bits, rounded to
    // nearest even by the fp32 addition itself
    const uint32_t sum = float_bits(bits_float(mag) + 0.5f);
    return static_cast<uint16_t>(sign | (sum - 0x3f000000u));
  }
  // rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even
  const uint32_t rounded = mag + 0xc8000fffu + ((mag >> 13) & 1u);
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

inline float fp16_value(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu,
                 mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24
    return bits_float(sign | float_bits(magnitude));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

}  // namespace portable

inline uint16_t fp16_bits(float x) {
#ifdef __F16C__
  return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
#else
  return portable::fp16_bits(x);
#endif
}

inline float fp16_value(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return portable::fp16_value(h);
#endif
}

inline float to_f32(float x) { return x; }
inline float to_f32(Bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_f32(Fp16 x) { return fp16_value(x.bits); }

inline void store(float x, float& dst) { dst = x; }
inline void store(float x, Bf16& dst) { dst.bits = bf16_bits(x); }
inline void store(float x, Fp16& dst) { dst.bits = fp16_bits(x); }

// dst[0, n) <- src rounded to T.
template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(src[i], dst[i]);
}

template <>
inline void store_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

#ifdef __AVX512F__
template <>
inline void store_row<Fp16>(const float* src, Fp16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) store(src[i], dst[i]);
}
#endif

// One KV head's d values into an int8 cache row (values, then the scale), by common.h's int8 rule.
inline void quantize_head(const float* x, int64_t d, I8* row) {
  const float scale = int8_scale(x, d);
  for (int64_t i = 0; i < d; ++i) row[i].value = static_cast<int8_t>(int8_value(x[i], scale));
  std::memcpy(row + d, &scale, sizeof(scale));
}

// An int8 cache row's d values in fp32: q * scale.
inline void dequantize_head(const I8* row, int64_t d, float* out) {
  float scale;
  std::memcpy(&scale, row + d, sizeof(scale));
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(row[i].value) * scale;
}

// cache [slots, kv, head_elems<T>(d)] <- values rows [n, kv * d] (fp32, rounded or quantized to T) at slot_mapping;
// kBadIndex (nothing written) on a bad slot. values_stride: floats between consecutive value rows (<= 0: kv * d,
// i.e. contiguous).
template <typename T>
int write_rows(T* cache, int64_t slots, int64_t kv, int64_t d, const float* values, const int32_t* slot_mapping,
               int64_t n, int64_t values_stride = 0);

}  // namespace cogvlm2
