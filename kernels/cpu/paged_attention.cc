// Paged attention over a flat varlen batch, fused with the KV-cache write.
//
// Tokens may come in any order (the model passes them in expert-routed order): each carries its sequence index and
// its position in that sequence, and attends causally to positions [0, position] of its sequence, read through the
// sequence's block table straight from the cache (no gathered K/V). Queries of one sequence are grouped into tiles
// of consecutive positions so that each K/V row fetched serves tile x (heads per KV head) query rows; the softmax is
// computed online over key tiles. The caches hold float32, bfloat16, float16 or int8 (kv_cache.h): 16-bit K/V rows
// are widened to fp32 as they are read, int8 ones dequantized into a per-thread buffer once per key tile, so a
// 16-bit cache halves the bytes that bound decode attention at long contexts and an int8 one nearly quarters them.
// bf16 math (config, for compute dtype bfloat16): the probabilities are rounded to bf16 before P @ V (products
// exact in fp32, accumulated in fp32; softmax, sums and the output stay fp32). Over a bf16 cache on a CPU with
// vdpbf16ps, the query tiles' products run as bf16 dot products on the cache's own rows: P @ V on the rounded P,
// and Q K^T on the fp32 queries split into two bf16 parts (rounding the queries instead moved the demo model's
// logits by up to 0.23, cosine 0.99982 against the goldens: scores carry |q||k| of rounding).

#include <cmath>
#include <limits>

#include "attention_amx.h"
#include "attention_math.h"
#include "gemm_amx.h"
#include "kv_cache.h"
#include "rope.h"

namespace cogvlm2 {
namespace {

struct Shapes {
  int64_t n, heads, kv, d, slots, seqs, max_blocks;
  int64_t q_stride;  // floats between consecutive tokens' queries: heads * d, or (heads + 2 kv) * d for fused QKV
};

struct Config {
  int64_t block_size, threads, query_tile, key_tile, parallel_min_work;
  bool bf16_math;
  bool amx;  // bf16 math over a bf16 cache: the query tiles' products on AMX tiles where the CPU has them
};

struct Tile {
  int64_t seq, begin, end;  // range in `order`
  int64_t keys;             // keys the tile reads: max position + 1
};

// Tokens sorted by (sequence, position), cut into tiles of at most query_tile tokens of one sequence.
std::vector<Tile> make_tiles(const int32_t* seq_index, const int32_t* position, const Shapes& s,
                             int64_t query_tile, std::vector<int64_t>& order) {
  order.resize(s.n);
  for (int64_t i = 0; i < s.n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return seq_index[a] != seq_index[b] ? seq_index[a] < seq_index[b] : position[a] < position[b];
  });
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < s.n;) {
    const int64_t seq = seq_index[order[i]];
    int64_t j = i;
    while (j < s.n && j - i < query_tile && seq_index[order[j]] == seq) ++j;
    tiles.push_back({seq, i, j, static_cast<int64_t>(position[order[j - 1]]) + 1});
    i = j;
  }
  return tiles;
}

// Rows dequantized to fp32 (an int8 cache's), valid until the buffer is filled again.
struct RowBuffer {
  std::vector<float> values;
  std::vector<const float*> rows;
};

template <typename T>
struct Scratch {
  std::vector<float> q, qt, out, scores, row_max, row_sum, correction;
  std::vector<uint32_t> qt2, pairs;  // bf16 dot products: the queries' element pairs, the probabilities' key pairs
  std::vector<int64_t> slots;
  std::vector<const T*> key_rows, value_rows;
  RowBuffer keys, values;
};

// The rows as the score and P @ V loops read them: a float or 16-bit cache's own rows; an int8 cache's rows of
// `heads` KV heads each (consecutive head rows of head_elems<I8>(d)) dequantized into `buffer`, [heads * d] apiece.
template <typename T>
const T* const* readable(const T* const* rows, int64_t, int64_t, int64_t, RowBuffer&) {
  return rows;
}

inline const float* const* readable(const I8* const* rows, int64_t width, int64_t heads, int64_t d,
                                    RowBuffer& buffer) {
  const int64_t row = heads * d;
  buffer.values.resize(width * row);
  buffer.rows.resize(width);
  for (int64_t j = 0; j < width; ++j) {
    if (j + kPrefetchKeys < width) prefetch_row(rows[j + kPrefetchKeys], heads * head_elems<I8>(d));
    float* out = buffer.values.data() + j * row;
    for (int64_t g = 0; g < heads; ++g) dequantize_head(rows[j] + g * head_elems<I8>(d), d, out + g * d);
    buffer.rows[j] = out;
  }
  return buffer.rows.data();
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Online-softmax state of one KV head's query rows within a tile: lane = token * group + h.
struct Lanes {
  int64_t count, stride;  // used lanes, allocated lanes (a multiple of 16)
  float* max;
  float* sum;
  float* out;  // [stride][d]
};

// The online-softmax step over a key tile's scores [width][stride]: a lane whose token sees visible[lane /
// lanes_per_token] of the tile's keys gets probability 0 past them; then the running max, the correction of the
// earlier sums (left in `correction` for P @ V) and the sums. Returns the keys any lane sees. The first key tile
// shows every lane key 0, so the running max is finite from then on.
int64_t softmax_step(const Lanes& lanes, int64_t lanes_per_token, const int64_t* visible, int64_t width,
                     float* scores, float* correction) {
  const int64_t stride = lanes.stride;
  for (int64_t lane = 0; lane < lanes.count; ++lane)
    for (int64_t j = std::max<int64_t>(visible[lane / lanes_per_token], 0); j < width; ++j)
      scores[j * stride + lane] = kNegInf;
  column_max(scores, width, stride, correction);  // the tile's max per lane, for now
  for (int64_t lane = 0; lane < stride; ++lane) {
    const float new_max = std::max(lanes.max[lane], correction[lane]);
    correction[lane] = std::exp(lanes.max[lane] - new_max);
    lanes.max[lane] = new_max;
  }
  exp_shifted_rows(scores, lanes.max, width, stride);
  int64_t seen = 0;
  for (int64_t lane = 0; lane < lanes.count; ++lane) {
    const int64_t lane_seen = std::max<int64_t>(visible[lane / lanes_per_token], 0);
    for (int64_t j = lane_seen; j < width; ++j) scores[j * stride + lane] = 0.f;
    seen = std::max(seen, lane_seen);
  }
  for (int64_t lane = 0; lane < stride; ++lane) lanes.sum[lane] *= correction[lane];
  column_sum_into(scores, seen, stride, lanes.sum);
  return seen;
}

// The probabilities rounded to bf16 in place (bf16 math's P, after the fp32 sums took them).
void round_to_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_rounded(x[i]);
}

// What one KV head's tile update reads besides the rows: the queries (q [stride][d] and transposed qt [d][stride]),
// and for the bf16 dot products (qt2 non-null) their split pairs and a buffer for P's pairs.
struct TileQueries {
  const float* q;
  const float* qt;
  const uint32_t* qt2;  // null: fp32 products
  uint32_t* pairs;
  bool bf16_math;
};

// One KV head over one key tile: scores [key][stride] (few rows: a dot product per (row, key); else from the
// transposed queries, 16 lanes per FMA, or bf16 pairs per vdpbf16ps), the softmax step and P @ V. Lane = token *
// group + h.
template <typename T>
void update_lanes(const Lanes& lanes, int64_t group, int64_t d, const TileQueries& tq, const int64_t* visible,
                  const T* const* key_rows, const T* const* value_rows, int64_t width, float* scores,
                  float* correction) {
  const bool dot = score_rows_dot(tq.q, lanes.count, key_rows, width, d, lanes.stride, scores);
  if constexpr (std::is_same_v<T, Bf16>) {
    if (!dot && tq.qt2 != nullptr) score_rows_bf16(tq.qt2, key_rows, width, d, lanes.stride, scores);
  }
  if (!dot && (tq.qt2 == nullptr || !std::is_same_v<T, Bf16>)) score_rows(tq.qt, key_rows, width, d, lanes.stride,
                                                                          scores);
  const int64_t seen = softmax_step(lanes, group, visible, width, scores, correction);
  if constexpr (std::is_same_v<T, Bf16>) {
    if (tq.qt2 != nullptr) {
      probability_pairs(scores, seen, lanes.stride, tq.pairs);
      accumulate_pv_bf16(lanes.out, d, correction, tq.pairs, lanes.stride, value_rows, seen, lanes.count);
      return;
    }
  }
  if (tq.bf16_math) round_to_bf16(scores, seen * lanes.stride);
  accumulate_pv(lanes.out, d, correction, scores, lanes.stride, value_rows, seen, lanes.count);
}

// update_lanes' bf16 dot products on AMX tiles (attention_amx.h): the same softmax step between them, and the
// output transposed, lanes.out [d][stride].
void update_lanes_amx(const Lanes& lanes, int64_t group, int64_t d, const TileQueries& tq, const int64_t* visible,
                      const Bf16* const* key_rows, const Bf16* const* value_rows, int64_t width, float* scores,
                      float* correction) {
  amx_scores(tq.qt2, key_rows, width, d, lanes.stride, scores);
  const int64_t seen = softmax_step(lanes, group, visible, width, scores, correction);
  probability_pairs(scores, seen, lanes.stride, tq.pairs);
  amx_accumulate_pv(lanes.out, d, correction, tq.pairs, lanes.stride, value_rows, seen);
}

// The online-softmax state of `lanes` lanes (sums, running max, out rows of d) and a key tile's buffers.
template <typename T>
void reset_scratch(Scratch<T>& w, int64_t lanes, int64_t d, int64_t key_tile, int64_t score_stride) {
  w.out.assign(lanes * d, 0.f);
  w.row_max.assign(lanes, kNegInf);
  w.row_sum.assign(lanes, 0.f);
  w.scores.resize(key_tile * score_stride);
  w.correction.resize(lanes);
  w.slots.resize(key_tile);
  w.key_rows.resize(key_tile);
  w.value_rows.resize(key_tile);
}

// dst[i] = acc[i * step] / sum: an output row from its lane's sums (step 1; the lane's stride in a transposed out).
void store_output(const float* acc, float sum, int64_t d, float* dst, int64_t step = 1) {
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < d; ++i) dst[i] = acc[i * step] * inv;
}

float query_scale(int64_t d) { return 1.f / std::sqrt(static_cast<float>(d)); }

// A query row scaled by query_scale(d).
void scale_query(const float* src, int64_t d, float scale, float* dst) {
  for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * scale;
}

// bf16 pair of the high (low: false) bf16 parts of x[0] and x[1] (x = high + low).
uint32_t split_pair(const float* x, bool high) {
  uint32_t pair = 0;
  for (int e = 0; e < 2; ++e) {
    const float part = high ? x[e] : x[e] - bf16_rounded(x[e]);
    pair |= static_cast<uint32_t>(bf16_bits(part)) << (16 * e);
  }
  return pair;
}

// The tile's queries, scaled by query_scale(d), per KV head g in lanes [g * stride, g * stride + count) (lane = token *
// group + h for query head g * group + h): w.q [kv][stride][d], and transposed, w.qt [kv][d][stride]; with pairs,
// also as bf16 element pairs of their two parts w.qt2 [kv][2][d / 2][stride] (score_rows_bf16).
template <typename T>
void load_queries(const Tile& tile, const Shapes& s, const Config& c, const float* q, const int64_t* order,
                  int64_t stride, bool pairs, Scratch<T>& w) {
  const int64_t group = s.heads / s.kv, d = s.d;
  const float scale = query_scale(d);
  w.q.assign(s.kv * stride * d, 0.f);
  for (int64_t t = 0; t < tile.end - tile.begin; ++t)
    for (int64_t head = 0; head < s.heads; ++head)
      scale_query(q + order[tile.begin + t] * s.q_stride + head * d, d, scale,
                  w.q.data() + ((head / group) * stride + t * group + head % group) * d);
  w.qt.resize(s.kv * d * stride);
  for (int64_t g = 0; g < s.kv; ++g)
    for (int64_t lane = 0; lane < stride; ++lane)
      for (int64_t i = 0; i < d; ++i) w.qt[(g * d + i) * stride + lane] = w.q[(g * stride + lane) * d + i];
  if (!pairs) return;
  w.qt2.resize(s.kv * d * stride);
  for (int64_t g = 0; g < s.kv; ++g)
    for (int part = 0; part < 2; ++part)
      for (int64_t i = 0; i < d / 2; ++i)
        for (int64_t lane = 0; lane < stride; ++lane)
          w.qt2[((g * 2 + part) * (d / 2) + i) * stride + lane] =
              split_pair(w.q.data() + (g * stride + lane) * d + 2 * i, part == 0);
}

// Cache rows of keys [k0, k0 + width) through the sequence's block table.
void key_slots(const int32_t* block_table, int64_t block_size, int64_t k0, int64_t width, int64_t* slots) {
  int64_t block = k0 / block_size, offset = k0 % block_size;
  for (int64_t j = 0; j < width; ++j) {
    slots[j] = static_cast<int64_t>(block_table[block]) * block_size + offset;
    if (++offset == block_size) offset = 0, ++block;
  }
}

// One query tile (consecutive positions of one sequence), all heads. Per key tile and KV head, the K/V rows are
// fetched once for all the tile's query rows of that head's group.
template <typename T>
void attend_tile(const Tile& tile, const Shapes& s, const Config& c, const float* q, const T* keys, const T* values,
                 const int32_t* block_table, const int64_t* order, const int32_t* position, float* out,
                 Scratch<T>& w) {
  const int64_t group = s.heads / s.kv, d = s.d, tokens = tile.end - tile.begin, count = tokens * group;
  const int64_t stride = (count + 15) / 16 * 16, kt = c.key_tile, head = head_elems<T>(d), row_stride = s.kv * head;
  const bool pairs = std::is_same_v<T, Bf16> && c.bf16_math && bf16_dot_applies(d) && cpu_has_bf16_dot();
  // AMX takes what the vdpbf16ps forms would (update_lanes: more rows than the dot-product form's)
  const bool amx = pairs && count > kDotMaxRows && c.amx && amx_attention_applies(d);
  const int64_t score_rows = amx ? round_up(kt, kAmxRows) : kt;  // AMX stores whole tiles of keys
  load_queries(tile, s, c, q, order, stride, pairs, w);
  reset_scratch(w, s.kv * stride, d, score_rows, stride);
  if (pairs) w.pairs.resize(round_up((kt + 1) / 2, kAmxRows) * stride);  // AMX reads whole tiles of key pairs
  if (amx) configure_amx_tiles();
  std::vector<int64_t> visible(tokens);
  for (int64_t k0 = 0; k0 < tile.keys; k0 += kt) {
    const int64_t width = std::min(kt, tile.keys - k0);
    for (int64_t t = 0; t < tokens; ++t)
      visible[t] = std::min<int64_t>(width, position[order[tile.begin + t]] + 1 - k0);
    key_slots(block_table, c.block_size, k0, width, w.slots.data());
    for (int64_t g = 0; g < s.kv; ++g) {
      for (int64_t j = 0; j < width; ++j) {
        w.key_rows[j] = keys + w.slots[j] * row_stride + g * head;
        w.value_rows[j] = values + w.slots[j] * row_stride + g * head;
      }
      // the inner loops ask for rows kPrefetchKeys ahead: the first ones of each pass are asked for here
      for (int64_t j = 0; j < std::min(width, kPrefetchKeys); ++j) {
        prefetch_row(w.key_rows[j], d);
        prefetch_row(w.value_rows[j], d);
      }
      const Lanes lanes{count, stride, w.row_max.data() + g * stride, w.row_sum.data() + g * stride,
                        w.out.data() + g * stride * d};
      const TileQueries tq{w.q.data() + g * stride * d, w.qt.data() + g * d * stride,
                           pairs ? w.qt2.data() + g * d * stride : nullptr, w.pairs.data(), c.bf16_math};
      if constexpr (std::is_same_v<T, Bf16>) {
        if (amx) {
          update_lanes_amx(lanes, group, d, tq, visible.data(), w.key_rows.data(), w.value_rows.data(), width,
                           w.scores.data(), w.correction.data());
          continue;
        }
      }
      update_lanes(lanes, group, d, tq, visible.data(), readable(w.key_rows.data(), width, 1, d, w.keys),
                   readable(w.value_rows.data(), width, 1, d, w.values), width, w.scores.data(), w.correction.data());
    }
  }
  if (amx) release_amx_tiles();
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t head = 0; head < s.heads; ++head) {
      const int64_t g = head / group, lane = t * group + head % group;
      float* dst = out + (order[tile.begin + t] * s.heads + head) * d;
      if (amx)
        store_output(w.out.data() + g * stride * d + lane, w.row_sum[g * stride + lane], d, dst, stride);
      else
        store_output(w.out.data() + (g * stride + lane) * d, w.row_sum[g * stride + lane], d, dst);
    }
}

// A one-token tile (a decode) with few heads per KV head: all heads in one lane set, lane = query head, so the
// softmax runs on full vectors instead of a few lanes per KV head, and a key's K rows of all KV heads are read as
// one contiguous slot row. The same per-lane arithmetic as attend_tile.
template <typename T>
void attend_decode(const Tile& tile, const Shapes& s, const Config& c, const float* q, const T* keys,
                   const T* values, const int32_t* block_table, const int32_t* position, int64_t token, float* out,
                   Scratch<T>& w) {
  const int64_t group = s.heads / s.kv, d = s.d, stride = (s.heads + 15) / 16 * 16, kt = c.key_tile;
  const int64_t head = head_elems<T>(d), row_stride = s.kv * head;
  const float scale = query_scale(d);
  w.q.resize(s.heads * d);
  scale_query(q + token * s.q_stride, s.heads * d, scale, w.q.data());
  reset_scratch(w, stride, d, kt, stride);
  const Lanes lanes{s.heads, stride, w.row_max.data(), w.row_sum.data(), w.out.data()};
  for (int64_t k0 = 0; k0 < tile.keys; k0 += kt) {
    const int64_t width = std::min(kt, tile.keys - k0);
    const int64_t visible = std::min<int64_t>(width, position[token] + 1 - k0);
    key_slots(block_table, c.block_size, k0, width, w.slots.data());
    for (int64_t j = 0; j < width; ++j) w.key_rows[j] = keys + w.slots[j] * row_stride;
    for (int64_t j = 0; j < std::min(width, kPrefetchKeys); ++j) prefetch_row(w.key_rows[j], row_stride);
    score_heads_dot(w.q.data(), group, s.kv, readable(w.key_rows.data(), width, s.kv, d, w.keys), width, d, stride,
                    w.scores.data());
    const int64_t seen = softmax_step(lanes, stride, &visible, width, w.scores.data(), w.correction.data());
    if (c.bf16_math) round_to_bf16(w.scores.data(), seen * stride);
    for (int64_t g = 0; g < s.kv; ++g) {
      for (int64_t j = 0; j < seen; ++j) w.value_rows[j] = values + w.slots[j] * row_stride + g * head;
      for (int64_t j = 0; j < std::min(seen, kPrefetchKeys); ++j) prefetch_row(w.value_rows[j], d);
      accumulate_pv(w.out.data() + g * group * d, d, w.correction.data() + g * group, w.scores.data() + g * group,
                    stride, readable(w.value_rows.data(), seen, 1, d, w.values), seen, group);
    }
  }
  for (int64_t head = 0; head < s.heads; ++head)
    store_output(w.out.data() + head * d, w.row_sum[head], d, out + (token * s.heads + head) * d);
}

int validate(const Shapes& s, const Config& c, const int32_t* seq_index, const int32_t* position,
             const int32_t* block_tables, const int32_t* context_lens) {
  if (c.block_size <= 0 || c.query_tile <= 0 || c.key_tile <= 0 || s.kv <= 0 || s.heads % s.kv != 0 ||
      s.heads / s.kv > 128)  // a tile's rows of one KV head must fit the 8-register score kernel
    return kBadShape;
  for (int64_t i = 0; i < s.n; ++i) {
    const int64_t seq = seq_index[i], pos = position[i];
    if (seq < 0 || seq >= s.seqs || pos < 0 || pos >= context_lens[seq]) return kBadIndex;
    if (pos / c.block_size >= s.max_blocks) return kBadIndex;
  }
  for (int64_t b = 0; b < s.seqs; ++b) {
    const int64_t used = (static_cast<int64_t>(context_lens[b]) + c.block_size - 1) / c.block_size;
    if (used > s.max_blocks) return kBadIndex;
    for (int64_t i = 0; i < used; ++i) {
      const int64_t block = block_tables[b * s.max_blocks + i];
      if (block < 0 || (block + 1) * c.block_size > s.slots) return kBadIndex;
    }
  }
  return kOk;
}

// Rotary of q and k_new by position id, when asked: into copies (q and k_new are left as they are).
struct Rotated {
  std::vector<float> q, k;
};

// q and k rows are s.q_stride apart (fused QKV, or q's own stride; k then follows the same token stride).
int rotate_inputs(const Shapes& s, const float* q, const float* k, int64_t k_stride, const int32_t* positions,
                  const float* cos, const float* sin, int64_t table_rows, Rotated& r) {
  for (int64_t i = 0; i < s.n; ++i)
    if (positions[i] < 0 || positions[i] >= table_rows) return kBadIndex;
  r.q.resize(s.n * s.heads * s.d);
  r.k.resize(s.n * s.kv * s.d);
  for (int64_t i = 0; i < s.n; ++i) {
    const float* c = cos + static_cast<int64_t>(positions[i]) * s.d;
    const float* sn = sin + static_cast<int64_t>(positions[i]) * s.d;
    rotate_rows(q + i * s.q_stride, r.q.data() + i * s.heads * s.d, s.heads, s.d, c, sn);
    rotate_rows(k + i * k_stride, r.k.data() + i * s.kv * s.d, s.kv, s.d, c, sn);
  }
  return kOk;
}

// The sizes and options of one call, read from its checked parameters.
struct Call {
  Shapes s;
  Config c;
  bool fused, apply_rope;
  CacheType cache;  // of both caches
};

// Arity, dtypes and ranks. fused: k_new and v_new are [1] placeholders, q is the QKV projection.
int check_layout(const Args& a, bool& fused, CacheType& cache) {
  if (a.nparam != 15) return kBadArity;
  for (int i : {0, 1, 2, 11, 12, 14})
    if (!a.is_f32(i)) return kBadDtype;
  for (int i : {5, 6, 7, 8, 9, 10, 13})
    if (!a.is_i32(i)) return kBadDtype;
  CacheType value_cache;
  if (!cache_type(a, 3, cache) || !cache_type(a, 4, value_cache)) return kBadDtype;
  if (cache != value_cache) return kCacheDtypeMismatch;
  fused = a.rank(1) == 1 && a.rank(2) == 1;
  if (a.rank(0) != 3 || (!fused && (a.rank(1) != 3 || a.rank(2) != 3)) || a.rank(3) != 3 || a.rank(4) != 3 ||
      a.rank(8) != 2 || a.numel(13) < 6)  // the 7th config entry (bf16 math) is optional
    return kBadShape;
  return kOk;
}

// Sizes and config once the layout is checked, then every tensor's extent against them.
int read_call(const Args& a, Call& call) {
  const int64_t n = a.dim(0, 0), kv = a.dim(3, 1), d = a.dim(0, 2);
  const int64_t heads = call.fused ? a.dim(0, 1) - 2 * kv : a.dim(0, 1);
  if (heads <= 0) return kBadShape;
  call.s = Shapes{n, heads, kv, d, a.dim(3, 0), a.dim(8, 0), a.dim(8, 1), a.dim(0, 1) * d};
  const Shapes& s = call.s;
  const int32_t* cfg = a.data<int32_t>(13);
  call.c = Config{cfg[0], std::max(1, cfg[1]), cfg[2], cfg[3], cfg[4], a.numel(13) >= 7 && cfg[6] != 0,
                  a.numel(13) < 8 || cfg[7] != 0};
  call.apply_rope = cfg[5] != 0;
  const int64_t row = s.kv * s.d, cache_row = s.kv * head_elems(call.cache, s.d);
  if ((!call.fused && (a.numel(1) != s.n * row || a.numel(2) != s.n * row)) ||
      a.dim(3, 2) != head_elems(call.cache, s.d) || a.numel(4) != s.slots * cache_row || a.numel(5) != s.n || a.numel(6) != s.n || a.numel(7) != s.n ||
      a.numel(9) != s.seqs || a.numel(14) != s.n * s.heads * s.d)
    return kBadShape;
  if (call.apply_rope && (a.numel(10) != s.n || a.rank(11) != 2 || a.dim(11, 1) != s.d || a.rank(12) != 2 ||
                          a.dim(12, 0) != a.dim(11, 0) || a.dim(12, 1) != s.d || s.d % 2 != 0))
    return kBadShape;
  return kOk;
}

// This step's q, k and v rows as the cache write and the attention read them; strides in floats per token.
struct Inputs {
  const float* q;
  const float* k;
  const float* v;
  int64_t q_stride, k_stride, v_stride;  // k_stride 0 for the rotated copy: contiguous (write_rows' default)
};

int prepare_inputs(const Args& a, const Call& call, Rotated& rotated, Inputs& in) {
  const Shapes& s = call.s;
  const float* q = a.data<float>(0);
  // k_new and v_new rows: inside the fused rows (token stride q_stride), else their own contiguous tensors
  const float* k_new = call.fused ? q + s.heads * s.d : a.data<float>(1);
  const float* v_new = call.fused ? q + (s.heads + s.kv) * s.d : a.data<float>(2);
  const int64_t kv_stride = call.fused ? s.q_stride : s.kv * s.d;
  in = Inputs{q, k_new, v_new, s.q_stride, kv_stride, kv_stride};
  if (!call.apply_rope) return kOk;
  if (int status = rotate_inputs(s, q, k_new, kv_stride, a.data<int32_t>(10), a.data<float>(11), a.data<float>(12),
                                 a.dim(11, 0), rotated))
    return status;
  in.q = rotated.q.data();
  in.q_stride = s.heads * s.d;
  in.k = rotated.k.data();
  in.k_stride = 0;
  return kOk;
}

template <typename T>
int write_caches(const Args& a, const Shapes& s, const Inputs& in) {
  const int32_t* slot_mapping = a.data<int32_t>(5);
  if (int status = write_rows(a.data<T>(3), s.slots, s.kv, s.d, in.k, slot_mapping, s.n, in.k_stride)) return status;
  return write_rows(a.data<T>(4), s.slots, s.kv, s.d, in.v, slot_mapping, s.n, in.v_stride);
}

// Query tiles of the whole batch, largest first: the atomic hand-out then balances the threads.
std::vector<Tile> plan_tiles(const int32_t* seq_index, const int32_t* position, const Shapes& s, const Config& c,
                             std::vector<int64_t>& order) {
  // At most 128 query rows per KV head in a tile: the transposed scores keep them in 8 vector registers.
  const int64_t query_tile = std::max<int64_t>(1, std::min<int64_t>(c.query_tile, 128 / (s.heads / s.kv)));
  std::vector<Tile> tiles = make_tiles(seq_index, position, s, query_tile, order);
  std::sort(tiles.begin(), tiles.end(),
            [](const Tile& x, const Tile& y) { return x.keys * (x.end - x.begin) > y.keys * (y.end - y.begin); });
  return tiles;
}

int thread_count(const std::vector<Tile>& tiles, const Shapes& s, const Config& c) {
  int64_t work = 0;
  for (const Tile& t : tiles) work += t.keys * (t.end - t.begin) * s.heads * s.d;
  return work >= c.parallel_min_work ? static_cast<int>(c.threads) : 1;
}

template <typename T>
void attend_all(const Args& a, const Call& call, const Inputs& in) {
  const Shapes& s = call.s;
  const int32_t* position = a.data<int32_t>(7);
  const int32_t* block_tables = a.data<int32_t>(8);
  std::vector<int64_t> order;
  const std::vector<Tile> tiles = plan_tiles(a.data<int32_t>(6), position, s, call.c, order);
  Shapes attend = s;
  attend.q_stride = in.q_stride;
  const T* key_cache = a.data<T>(3);
  const T* value_cache = a.data<T>(4);
  float* out = a.data<float>(14);
  parallel_for(static_cast<int64_t>(tiles.size()), thread_count(tiles, s, call.c), [&](int64_t item) {
    thread_local Scratch<T> scratch;
    const Tile& tile = tiles[item];
    const int32_t* block_table = block_tables + tile.seq * s.max_blocks;
    if (tile.end - tile.begin == 1 && heads_dot_applies(s.heads / s.kv, s.d))
      attend_decode(tile, attend, call.c, in.q, key_cache, value_cache, block_table, position, order[tile.begin],
                    out, scratch);
    else
      attend_tile(tile, attend, call.c, in.q, key_cache, value_cache, block_table, order.data(), position, out,
                  scratch);
  });
}

}  // namespace
}  // namespace cogvlm2

// inputs: q [N,H,d], k_new [N,KV,d], v_new [N,KV,d] (f32), key_cache [S,KV,d], value_cache [S,KV,d] (both f32,
//         both bf16 or both f16; or both int8 [S,KV,d+4], kv_cache.h),
//         slot_mapping [N], seq_index [N], token_position [N], block_tables [B,M], context_lens [B] (i32),
//         rope_positions [N] (i32), cos [P,d], sin [P,d] (f32; any [1] tensors when rotary is off),
//         config [block_size, threads, query_tile, key_tile, parallel_min_work, apply_rope, bf16_math (optional),
//         amx (optional, default 1)] (i32)
//   or fused: q is the QKV projection [N, H+2KV, d] (q heads, then k, then v) and k_new, v_new are any [1]
//         tensors, so the layer's projection hands over one tensor (no slicing copies).
// output: [N, H*d] f32. k_new (rotated when apply_rope) and v_new are written into the caches first (in place,
// rounded to the caches' dtype); q is rotated on the fly.
// status: kBadDtype for another cache dtype, kCacheDtypeMismatch for caches of two dtypes.
COGVLM2_AOT(PagedAttention) {
  using namespace cogvlm2;
  Args a{nparam, params, ndims, shapes, dtypes};
  Call call{};
  if (int status = check_layout(a, call.fused, call.cache)) return status;
  if (int status = read_call(a, call)) return status;
  if (int status = validate(call.s, call.c, a.data<int32_t>(6), a.data<int32_t>(7), a.data<int32_t>(8),
                            a.data<int32_t>(9)))
    return status;
  Rotated rotated;
  Inputs in{};
  if (int status = prepare_inputs(a, call, rotated, in)) return status;
  return with_cache_type(call.cache, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (int status = write_caches<T>(a, call.s, in)) return status;
    attend_all<T>(a, call, in);
    return static_cast<int>(kOk);
  });
}
