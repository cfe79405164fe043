// The Python module of the CPU extension. The ops themselves register with the dispatcher when the
// library loads; this module reports how the library was built (for `python -m bmt_fast.info`) and
// allocates large results the way the CPU ops do.
#include <torch/extension.h>

#include "bmt_fast.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    bmt_fast::cpu::check_cpu_settings();  // a bad BMT_FAST_CPU_* value: the error that every op call raises
    pybind11::dict info;
    info["cpu_isa"] = bmt_fast::cpu::active_isa();
    info["cpu_isas_compiled"] = bmt_fast::cpu::compiled_isas();
    info["cpu_bf16_amx"] = bmt_fast::cpu::bf16_amx_enabled();
    info["cpu_fused"] = bmt_fast::cpu::fused_enabled();
    info["amx_min_features"] = bmt_fast::cpu::kAmxMinFeatures;
#ifdef _OPENMP
    info["openmp"] = _OPENMP;
#else
    info["openmp"] = 0;
#endif
    info["compiler"] = __VERSION__;
    info["bandwidth_floor"] = bmt_fast::kBandwidthFloor;
    info["gram_max_particles"] = bmt_fast::cpu::kGramRuleMaxParticles;  // (with enough features: prefers_gram)
    info["chunked_max_particles"] = bmt_fast::cpu::kChunkedMaxParticles;
    info["chunked_min_features"] = bmt_fast::cpu::kChunkedMinFeatures;
    info["chunked_wide_max_particles"] = bmt_fast::cpu::kChunkedWideMaxParticles;
    info["chunked_wide_features_per_particle"] = bmt_fast::cpu::kChunkedWideFeaturesPerParticle;
    info["tile_size"] = bmt_fast::cpu::kTileSize;
    info["huge_page_min_bytes"] = bmt_fast::cpu::kHugePageMinBytes;
    info["serial_max_work"] = bmt_fast::cpu::serial_max_work();  // (pairs x (features + 32), on one thread)
    return info;
  });
  // Whether fp32 particles take the AMX path now (torch's fp32 matmul precision for oneDNN is bf16; read at
  // every call, as the ops read it): the public API then knows that the kernel flags a non-finite phi.
  m.def("float32_matmul_in_bf16", [] { return bmt_fast::cpu::float32_matmul_in_bf16(); });
  // Whether "auto" takes the few-particle Gram path for these particles (n x d) in op ("svgd_step" with H
  // given, "median_bandwidth" or "rbf_kernel"; cpu/kernels.h): for tests and benchmarks.
  m.def("takes_gram_path", [](const at::Tensor& x, const std::string& op) {
    return bmt_fast::cpu::takes_gram_path(x, op);
  });
  m.def("takes_direct_path", [](const at::Tensor& x, const at::Tensor& y, const std::string& op) {
    return bmt_fast::cpu::takes_direct_path(x, y, op);
  });
  // An uninitialised contiguous CPU tensor shaped like `like`, on huge pages when large (cpu/huge_pages.h):
  // where the public API allocates a result itself (svgd_step's phi for its finiteness flag).
  m.def("empty_large_like", [](const at::Tensor& like) {
    return bmt_fast::cpu::empty_large(like.sizes(), like.options());
  });
  // The huge-page allocator's bytes (bmt_fast.memory_stats) and giving its cached blocks back to the OS
  // (bmt_fast.empty_cache).
  m.def("huge_page_stats", [] {
    const bmt_fast::cpu::HugePageStats stats = bmt_fast::cpu::huge_page_stats();
    pybind11::dict out;
    out["live_bytes"] = stats.live_bytes;
    out["cached_bytes"] = stats.cached_bytes;
    out["cached_blocks"] = stats.cached_blocks;
    return out;
  });
  m.def("empty_huge_page_cache", [] { bmt_fast::cpu::empty_huge_page_cache(); });
}
