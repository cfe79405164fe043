// Baseline build of the CPU kernels (any x86-64 or other CPU). Listed before the v3/v4 builds in the
// link so that any inline helper the compiler keeps out of line resolves to this portable copy.
#define BMT_FAST_ISA isa_base
#define BMT_FAST_VECTOR_BYTES 16  // SSE2: xmm
#include "kernels_impl.h"
