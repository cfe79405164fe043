// The Python module of the CUDA extension. The kernels register with the dispatcher when the library
// loads (svgd_cuda.cu); this module only reports how they were built (for `python -m bmt_fast.info`).
#include <torch/extension.h>

#include "../bmt_fast.h"
#include "config.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["gram_max_particles"] = bmt_fast::cuda::kGramMaxParticles;
    info["gram_max_rows"] = bmt_fast::cuda::kGramMaxRows;
    info["gram_register_rows"] = bmt_fast::cuda::kGramRegisterRows;
    info["rbf_gram_max_rows"] = bmt_fast::cuda::kRbfGramMaxRows;
    info["bandwidth_floor"] = bmt_fast::kBandwidthFloor;
    info["tensor_core_min_features"] = bmt_fast::cuda::kTensorCoreMinFeatures;
    info["fused_max_features"] = bmt_fast::cuda::kFusedMaxFeatures;
    info["distances"] =
        "fp32/fp64: IEEE CUDA cores (svgd_step with d > fused_max_features: cuBLAS row blocks); bf16/fp16 with "
        "d >= tensor_core_min_features: mma.sync tensor cores";
    return info;
  });
}
