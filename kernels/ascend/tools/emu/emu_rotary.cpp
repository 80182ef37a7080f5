// The real rotary kernel source, compiled against the emulated API for one dtype (EMU_DTYPE / EMU_SUFFIX).
#include "kernel_operator.h"
#include "tiling_structs.h"

#define EMU_TILING_TYPE RotaryCogvlm2TilingData
#define DTYPE_QUERY EMU_DTYPE
#define EMU_CAT2(a, b) a##_##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define rotary_cogvlm2 EMU_CAT(rotary_cogvlm2, EMU_SUFFIX)
#include "../../op_kernel/rotary_cogvlm2.cpp"
