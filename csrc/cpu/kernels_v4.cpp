// x86-64-v4 build of the CPU kernels (AVX-512F/BW/CD/DQ/VL)
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("arch=x86-64-v4")
#define BMT_FAST_ISA isa_v4
#define BMT_FAST_32_VECTOR_REGISTERS 1
#define BMT_FAST_VECTOR_BYTES 64
#include "kernels_impl.h"
#endif
