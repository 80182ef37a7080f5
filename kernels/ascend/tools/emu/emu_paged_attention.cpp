// The real paged-attention kernel source, compiled against the emulated API for one dtype.
#include "kernel_operator.h"
#include "tiling_structs.h"

#define EMU_TILING_TYPE PagedAttentionCogvlm2TilingData
#define DTYPE_QUERY EMU_DTYPE
#define EMU_CAT2(a, b) a##_##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define paged_attention_cogvlm2 EMU_CAT(paged_attention_cogvlm2, EMU_SUFFIX)
#include "../../op_kernel/paged_attention_cogvlm2.cpp"
