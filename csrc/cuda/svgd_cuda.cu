// The CUDA kernels of torch.ops.bmt_fast (schemas and Meta kernels: csrc/registration.cpp, in the CPU
// extension, which bmt_fast._extension loads first). The implementation is in ops.cuh; see there and
// in tiled_mma.cuh / tiled_ffma.cuh / gram.cuh for the algorithms.
#include "ops.cuh"

TORCH_LIBRARY_IMPL(bmt_fast, CUDA, m) { bmt_fast::cuda::register_kernels(m); }
