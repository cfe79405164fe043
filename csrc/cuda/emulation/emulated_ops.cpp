// The CUDA ops of csrc/cuda compiled for the CPU emulator (-DBMT_FAST_EMULATE), registered as their own
// library torch.ops.bmt_fast_cuda_emulated on CPU tensors with the schemas of torch.ops.bmt_fast. The
// tests build this with torch.utils.cpp_extension.load and compare it with the float64 reference, so
// the kernels' indexing, tiling, pipelining and synchronisation are exercised without a GPU.
#ifndef BMT_FAST_EMULATE
#error "compile with -DBMT_FAST_EMULATE"
#endif

#include "../ops.cuh"

TORCH_LIBRARY(bmt_fast_cuda_emulated, m) {
  m.def("svgd_step(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\") -> Tensor");
  m.def("svgd_step_into(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\", *,"
        " Tensor(a!) out) -> Tensor");
  m.def("svgd_step_batched_into(Tensor x, Tensor score, Tensor? bandwidth=None, str algorithm=\"auto\", *,"
        " Tensor(a!) out) -> Tensor");
  m.def("median_bandwidth(Tensor x, str algorithm=\"auto\") -> Tensor");
  m.def("rbf_kernel(Tensor x, Tensor y, Tensor bandwidth) -> Tensor");
  m.def("rbf_kernel_backward(Tensor grad, Tensor x, Tensor y, Tensor kernel, Tensor bandwidth, bool[3] output_mask)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bmt_fast_cuda_emulated, CPU, m) { bmt_fast::cuda::register_kernels(m); }

// The dynamic shared memory of each launch since the last call, in order; clears the record.
static std::vector<int64_t> take_launches() {
  std::vector<int64_t> taken(emu::launch_record().begin(), emu::launch_record().end());
  emu::launch_record().clear();
  return taken;
}

TORCH_LIBRARY_FRAGMENT(bmt_fast_cuda_emulated, m) { m.def("take_launches() -> int[]", &take_launches); }
