// x86-64-v3 build of the CPU kernels (AVX2, FMA, BMI2)
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("arch=x86-64-v3")
#define BMT_FAST_ISA isa_v3
#define BMT_FAST_VECTOR_BYTES 32
#include "kernels_impl.h"
#endif
