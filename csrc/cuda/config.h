// Choices of the CUDA kernels that callers may want to know (reported by build_info()).
#pragma once

#include <cstdint>

namespace bmt_fast::cuda {

// algorithm="auto" takes the Gram path (split-K Gram, then one memory-bound pass) up to this many
// particles, the tiled path beyond.
constexpr int64_t kGramMaxParticles = 256;
// The Gram path keeps an R x R float64 Gram matrix and selects its median in one CTA: at most this many
// rows (x rows, plus y rows for rbf_kernel), also when algorithm="gram" is asked for.
constexpr int64_t kGramMaxRows = 4096;
// Register-resident Gram and apply kernels up to this many rows; a tiled Gram kernel and a cuBLAS
// apply beyond.
constexpr int64_t kGramRegisterRows = 16;
// svgd_step_batched_into: sets of at most kGramRegisterRows particles on the Gram path run as one launch of
// each register kernel for up to this many sets (a grid's z extent), each set's CTAs as its single step's;
// other sets run one after another as svgd_step_into.
constexpr int64_t kMaxSetsPerLaunch = 65535;
// bf16 / fp16 inputs use the tensor-core kernels (16-bit dot products of the centred particles) from
// this many features on; below, the IEEE fp32 kernels: with few features the rounding of each coordinate
// to 16 bits does not average out (d = 1: ~2.5% error in phi for bf16), and the dot is no bottleneck.
constexpr int64_t kTensorCoreMinFeatures = 32;
// fp32 / fp64 svgd_step on the tiled path (many particles): the fused FFMA kernel up to this many features;
// beyond, blocks of rows through cuBLAS (the fused kernel recomputes each distance tile once per 128 (fp32)
// or 64 (fp64) output features). Measured on an H200 (benchmarks/results/nvidia-h200.csv, fp32): at
// d = 128 the fused kernel beat naive torch (1.72 vs 2.22 ms, n = 8192); at d = 768 it took 4.2x naive
// torch's time (8.41 vs 1.99 ms, n = 4096), whose cdist / exp / GEMM steps the row blocks follow. The
// switch between the two measured points is not itself measured yet.
constexpr int64_t kFusedMaxFeatures = 256;
// The bf16 tensor-core step multiplies K by score and by the particles apart (svgd_step_tiled_mma) where the
// largest |x - mean| exceeds this many sqrt(H), as the Triton kernels (kernels/svgd_step.py: SPLIT_SPREAD).
constexpr double kSplitSpread = 8.0;
// The row-block path's (rows x n) workspace, at most (one row at the least).
constexpr int64_t kBlockedWorkspaceBytes = int64_t{64} << 20;
// rbf_kernel(x, y) uses the Gram path while n + m stays within this (the kernel-density prior of the
// trainer: one or a few points against a few particles with a huge d).
constexpr int64_t kRbfGramMaxRows = 256;

}  // namespace bmt_fast::cuda
