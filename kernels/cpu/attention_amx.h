// Paged attention's bf16 products on AMX tiles (bf16 cache, compute dtype bfloat16, a CPU with amx_bf16): the two
// matrix products of a query tile and a key tile, for one KV head, as tile instructions of 16 x 16 outputs x 32
// bf16 products each. Both keep the layouts of the vdpbf16ps forms (attention_math.h), so the softmax between them
// is the same code:
//   scores^T [key][lane] = K [key][d] . Q^T, with K's rows as the A operand, a strided tile load straight from the
//     cache where 16 keys are consecutive slots (always so within a 16-aligned run of a block), and the queries'
//     split bf16 pairs qt2 (high, then low part) as the B operand: two tile products per 32 of d.
//   out^T [d][lane] = out^T * correction + V^T [d][key] . P, with P's key pairs (probability_pairs) as the B
//     operand and V^T built once per key tile (the cache's rows interleaved by key pairs, then transposed), so the
//     transposition costs keys x d per key tile whatever the number of query rows.
#pragma once

#include <cstdint>

#include "kv_cache.h"

namespace cogvlm2 {

// Whether the products take AMX tiles: the CPU has them and d is a whole number of 32-element tiles, up to 256.
bool amx_attention_applies(int64_t d);

// The calls below run between configure_amx_tiles() and release_amx_tiles() (gemm_amx.h).

// scores[j][lane] for j < round_up(width, kAmxRows), lane < stride (a multiple of 16): key row j (bf16 [d]) dotted with
// the queries' pairs qt2 [2][d / 2][stride] (high parts then low parts); rows past width get 0.
void amx_scores(const uint32_t* qt2, const Bf16* const* key_rows, int64_t width, int64_t d, int64_t stride,
                float* scores);

// out_t[i][lane] = out_t[i][lane] * correction[lane] + sum_{j < seen} P[j][lane] v_rows[j][i] for i < d, lane <
// stride, P as probability_pairs wrote it into pairs [ceil(seen / 2)][stride]; pairs must hold
// round_up(ceil(seen / 2), kAmxRows) rows (the rest are zeroed here).
void amx_accumulate_pv(float* out_t, int64_t d, const float* correction, uint32_t* pairs, int64_t stride,
                       const Bf16* const* v_rows, int64_t seen);

}  // namespace cogvlm2
