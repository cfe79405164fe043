// The Python module of the CPU extension. The ops themselves register with the dispatcher when the
// library loads; this module only reports how the library was built (for `python -m bmt_fast.info`).
#include <torch/extension.h>

#include "bmt_fast.h"
#include "cpu/kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["cpu_isa"] = bmt_fast::cpu::active_isa();
    info["cpu_isas_compiled"] = bmt_fast::cpu::compiled_isas();
#ifdef _OPENMP
    info["openmp"] = _OPENMP;
#else
    info["openmp"] = 0;
#endif
    info["compiler"] = __VERSION__;
    info["bandwidth_floor"] = bmt_fast::kBandwidthFloor;
    info["gram_max_particles"] = bmt_fast::cpu::kGramMaxParticles;
    info["tile_size"] = bmt_fast::cpu::kTileSize;
    return info;
  });
}
