// Many-particle kernels on tensor cores (mma.sync m16n8k16, sm_80+) for bf16 / fp16 inputs, in the
// FlashAttention-2 pattern: a CTA keeps 128 rows of particles (8 warps x 16 rows) and streams 64-column
// blocks of the others through a two-stage cp.async pipeline.
//
//   S  = A_I B_J^T          16-bit operands (the centred particles rounded to the input's type), fp32
//                           accumulation, the depth in chunks of 128 (A stays resident when d <= 128)
//   K  = exp(-max(|a|^2 + |b|^2 - 2 S, 0) / H)   in fp32 registers, straight from the accumulators
//   kSvgd: O += K W_J       K rounded to the input's 16-bit type as the A operand (the accumulator
//                           layout of two n8 tiles is the A layout of one k16 step), W^T (features x
//                           particles) from smem; row sums of K in fp32 from the same registers
//          split (bf16, a device flag): W = score, and O += K' B_J as well, K' = -(2/H) K rounded to
//                           bf16, B_J the distances' operand block still in smem (ldmatrix.trans): the
//                           depth chunks of S go in an order that ends with the CTA's own 128 features;
//                           row sums of the rounded K' (see svgd_step_tiled_mma)
//          then phi = (O / w_scale + c x_i + score_i) / n in the input's type, c = (2/H) rowsum with
//                           the centred x_i (folded), minus the row sums of K' with the operand's b_i (split)
//   kRbf / kMedian          store K / histogram the distances instead
//
// fp16 inputs use fp16 for both products, with W scaled by a power of two (exact) by the caller so that
// max |W| = 2^14 (W = score - (2/H) x overflows fp16 when H is small); rounding W to bf16 instead would
// cost about one fp16 ulp of phi, fp16 keeps the error at the level of the output rounding. The centred
// fp16 particles are scaled too, by a power of two s <= 1 that keeps them below 2^15 (particles spanning
// more than fp16's range, s = 1 otherwise): the caller passes H s^2 and unscales the median's H.
#pragma once

#include "device.cuh"
#include "radix.cuh"
#include "tiled_ffma.cuh"  // TileMode

namespace bmt_fast::cuda {

struct MmaGeometry {
  static constexpr int kRows = 128, kCols = 64, kChunk = 128, kFeatures = 128, kThreads = 256;
  static constexpr int kWarpRows = 16;
  static constexpr int kLdChunk = kChunk + 8;  // +16 bytes per row: ldmatrix rows hit 8 distinct bank groups
  static constexpr int kLdW = kCols + 8;
  static constexpr size_t kABytes = static_cast<size_t>(kRows) * kLdChunk * 2;
  static constexpr size_t kBBytes = static_cast<size_t>(kCols) * kLdChunk * 2;
  static constexpr size_t kNormBytes = static_cast<size_t>(kCols) * sizeof(float);  // |b_j|^2 of a column block
  static constexpr size_t kWBytes = static_cast<size_t>(kFeatures) * kLdW * 2;
  static constexpr size_t kHistBytes = 2 * kRadixBins * sizeof(unsigned);
  static constexpr size_t shared_bytes(TileMode mode, bool a_resident) {
    return (a_resident ? 1 : 2) * kABytes + 2 * kBBytes + 2 * kNormBytes +
           (mode == TileMode::kSvgd ? 2 * kWBytes : mode == TileMode::kMedian ? kHistBytes : 0);
  }
};

template <typename Out>
struct MmaParams {
  const uint16_t* a;  // (a_rows_padded x d_pad) centred particles in 16 bits: the rows of the result
  const uint16_t* b;  // (b_rows_padded x d_pad): the columns (== a for svgd_step and the median)
  const float* a_norms;  // |a_i|^2 of the 16-bit values, +inf for the padding rows (K = 0 there)
  const float* b_norms;
  long long a_rows, b_rows;  // particles (padding excluded)
  long long d_pad;           // row stride of a and b, a multiple of 16; zero beyond d
  const float* bandwidth;    // H, a device scalar
  bool self;
  // kSvgd: wt = W^T in the 16-bit type (features_padded x wt_ld), features padded to a multiple of 128,
  // columns to the padded b rows; phi (a_rows x d) in the 16-bit type, from xc (a_rows x d, fp32: x centred
  // by the mean), score (a_rows x d, 16-bit), repulsion = 2 / H (H unscaled) and w_scale (W's power-of-two
  // scale, fp16; nullptr: 1), device scalars
  const uint16_t* wt;
  long long wt_ld, d;
  uint16_t* phi;
  const float* xc;
  const uint16_t* score;
  const float* repulsion;
  const float* w_scale;
  // kSvgd, bf16: a device flag; true: W^T holds score^T and the kernel adds K' B_J (see the top of this file)
  const bool* split;
  // kRbf
  Out* kernel;
  // kMedian
  RadixPass pass;
  const RadixState* state;
  unsigned long long* hist;
};

// Copies rows [row0, row0 + rows) x columns [col0, col0 + width) of a 16-bit row-major matrix (row
// stride ld) to shared memory (row stride ld_shared), in 16-byte pieces; width is a multiple of 8.
BMT_DEVICE void copy_tile_async(uint16_t* shared, int ld_shared, const uint16_t* global, long long ld, long long row0,
                                long long col0, int rows, int width) {
  const int pieces = width / 8;
  for (int idx = threadIdx.x; idx < rows * pieces; idx += blockDim.x) {
    const int r = idx / pieces, piece = idx % pieces;
    cp_async_16(shared + r * ld_shared + 8 * piece, global + (row0 + r) * ld + col0 + 8 * piece);
  }
}

// Two fp32 values rounded to the 16-bit operand type, packed as one fragment register.
template <bool kHalf>
BMT_DEVICE uint32_t pack16(float low, float high) {
  return kHalf ? pack_pair(f16_bits(low), f16_bits(high)) : pack_pair(bf16_bits(low), bf16_bits(high));
}

template <bool kHalf, typename Out, TileMode kMode>
BMT_GLOBAL void BMT_LAUNCH_BOUNDS(256, 1) mma_tile_kernel(const MmaParams<Out> p) {
  using G = MmaGeometry;
  constexpr bool kSvgd = kMode == TileMode::kSvgd;
  BMT_DYNAMIC_SHARED(smem);
  const int num_chunks = static_cast<int>((p.d_pad + G::kChunk - 1) / G::kChunk);
  const bool a_resident = num_chunks == 1;
  // A stages (one when resident), B stages, the column norms' stages, then W stages (kSvgd) or the
  // histogram (kMedian)
  uint16_t* const a_base = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const b_base = a_base + (a_resident ? 1 : 2) * G::kRows * G::kLdChunk;
  float* const norm_base = reinterpret_cast<float*>(b_base + 2 * G::kCols * G::kLdChunk);
  uint16_t* const w_base = reinterpret_cast<uint16_t*>(norm_base + 2 * G::kCols);
  unsigned* hist = reinterpret_cast<unsigned*>(w_base);  // kMedian (no W stages)
  auto a_stage = [&](long long stage) { return a_base + (a_resident ? 0 : (stage & 1) * G::kRows * G::kLdChunk); };
  auto b_stage = [&](long long stage) { return b_base + (stage & 1) * G::kCols * G::kLdChunk; };
  auto norm_stage = [&](long long jl) { return norm_base + (jl & 1) * G::kCols; };
  auto w_stage = [&](long long jl) { return w_base + (jl & 1) * G::kFeatures * G::kLdW; };

  const int warp = threadIdx.x / kWarp, lane = lane_id(), g = lane / 4, t = lane % 4;
  const long long i0 = static_cast<long long>(blockIdx.x) * G::kRows;
  const long long f0 = static_cast<long long>(blockIdx.y) * G::kFeatures;
  const int warp_row = warp * G::kWarpRows;                   // this warp's 16 rows within the block
  const long long row_g = i0 + warp_row + g;                  // this lane's rows: row_g and row_g + 8
  const float norm_i[2] = {p.a_norms[row_g], p.a_norms[row_g + 8]};
  // exp(-dist / H) = exp2(dist * scale) with scale = -log2(e) / H (NaN for an invalid H)
  const float scale = kMode == TileMode::kMedian ? 0.f : -1.4426950408889634f * inverse_bandwidth(*p.bandwidth);
  // the split form (bf16): the depth chunks of S in the order y + 1, ..., num_chunks - 1, 0, ..., y, so that
  // the epilogue finds the CTA's own features (chunk y = blockIdx.y: kChunk == kFeatures) in B_J
  bool split = false;
  float neg_a = 0.f;  // -2 / H (bf16: no operand scale, so p.repulsion's H is the kernel's)
  if constexpr (kSvgd && !kHalf) {
    split = p.split != nullptr && *p.split;
    neg_a = -*p.repulsion;
  }
  static_assert(G::kChunk == G::kFeatures, "the split form finds a CTA's features in one depth chunk");
  const int chunk_shift = split ? static_cast<int>(blockIdx.y) + 1 : 0;
  auto chunk_of = [&](int slot) { return (slot + chunk_shift) % num_chunks; };
  // ldmatrix row addresses of this lane: A (16 x 16 at depth k) and B / W^T (two n8 tiles x k16)
  const int a_ld_row = lane % 16, a_ld_col = 8 * (lane / 16);
  const int b_ld_row = lane % 8 + 8 * (lane / 16), b_ld_col = 8 * ((lane / 8) % 2);

  unsigned long long prefix[2] = {0, 0};
  bool same_prefix = true;
  if constexpr (kMode == TileMode::kMedian) {
    prefix[0] = p.state->prefix[0];
    prefix[1] = p.state->prefix[1];
    same_prefix = prefix[0] == prefix[1];
    zero_histogram(hist);  // visible to all after the first barrier of the main loop
  }

  // The pipeline's events, in the order they are consumed: for each column block J its depth chunks of
  // S (A and B slices; the first also brings J's column norms), and (kSvgd) with the first chunk of
  // J + 1 the W^T block of J, so that O += K_J W_J runs in the same phase as S_{J+1} (one barrier per
  // column block when A is resident); a last event brings the last W^T block alone.
  const long long j_first = kMode == TileMode::kMedian ? i0 / G::kCols : 0;  // median: pairs i < j only
  const long long j_blocks = (p.b_rows + G::kCols - 1) / G::kCols - j_first;
  const long long s_events = j_blocks * num_chunks;
  const long long events = s_events + (kSvgd && j_blocks > 0 ? 1 : 0);

  auto issue = [&](long long e) {
    const long long jl = e / num_chunks;
    const int slot = static_cast<int>(e % num_chunks);
    const long long j0 = (j_first + jl) * G::kCols;
    if (kSvgd && slot == 0 && jl > 0)
      copy_tile_async(w_stage(jl - 1), G::kLdW, p.wt, p.wt_ld, f0, j0 - G::kCols, G::kFeatures, G::kCols);
    if (e >= s_events) return;
    const long long col0 = static_cast<long long>(chunk_of(slot)) * G::kChunk;
    const int width = static_cast<int>(p.d_pad - col0 < G::kChunk ? p.d_pad - col0 : G::kChunk);
    if (!a_resident) copy_tile_async(a_stage(e), G::kLdChunk, p.a, p.d_pad, i0, col0, G::kRows, width);
    copy_tile_async(b_stage(e), G::kLdChunk, p.b, p.d_pad, j0, col0, G::kCols, width);
    if (slot == 0 && threadIdx.x < G::kCols / 4)  // 16 bytes each
      cp_async_16(norm_stage(jl) + 4 * threadIdx.x, p.b_norms + j0 + 4 * threadIdx.x);
  };

  float s[8][4];                         // S: 16 rows x 64 columns per warp, 8 n8 tiles
  uint32_t pk[4][4];                     // K as the A operand of 4 k16 steps (kSvgd)
  float o[kSvgd ? 16 : 1][4] = {};       // O: 16 rows x 128 features per warp (kSvgd)
  float rs[2] = {0.f, 0.f};              // row sums of rows g and g + 8

  if (a_resident) copy_tile_async(a_base, G::kLdChunk, p.a, p.d_pad, i0, 0, G::kRows, static_cast<int>(p.d_pad));
  if (events > 0) issue(0);
  cp_async_commit();

  for (long long e = 0; e < events; ++e) {
    cp_async_wait<0>();
    __syncthreads();  // event e has landed for all threads, and all are done with event e - 1
    if (e + 1 < events) {
      issue(e + 1);  // into the buffers of event e - 1
      cp_async_commit();
    }
    const long long jl = e / num_chunks;
    const int slot = static_cast<int>(e % num_chunks);
    const long long j0 = (j_first + jl) * G::kCols;

    if (e < s_events) {
      const long long col0 = static_cast<long long>(chunk_of(slot)) * G::kChunk;
      const int width = static_cast<int>(p.d_pad - col0 < G::kChunk ? p.d_pad - col0 : G::kChunk);
      const uint16_t* a = a_stage(e) + (warp_row + a_ld_row) * G::kLdChunk + a_ld_col;
      const uint16_t* b = b_stage(e) + b_ld_row * G::kLdChunk + b_ld_col;
      if (slot == 0)
        for (int nt = 0; nt < 8; ++nt)
          for (int r = 0; r < 4; ++r) s[nt][r] = 0.f;
      for (int ks = 0; ks < width / 16; ++ks) {
        uint32_t fa[4];
        ldmatrix_x4(fa, a + ks * 16);
#pragma unroll
        for (int np = 0; np < 4; ++np) {  // n8 tiles 2 np and 2 np + 1
          uint32_t fb[4];
          ldmatrix_x4(fb, b + np * 16 * G::kLdChunk + ks * 16);
          mma_16816<kHalf>(s[2 * np], fa, {fb[0], fb[1]});
          mma_16816<kHalf>(s[2 * np + 1], fa, {fb[2], fb[3]});
        }
      }
    }
    if constexpr (kSvgd) {  // O += K_{J-1} W_{J-1}: B = W^T block (features x particles) in shared memory
      if (slot == 0 && jl > 0) {
        const uint16_t* w = w_stage(jl - 1) + b_ld_row * G::kLdW + b_ld_col;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
          for (int fp = 0; fp < 8; ++fp) {  // feature tiles 2 fp and 2 fp + 1
            uint32_t fb[4];
            ldmatrix_x4(fb, w + fp * 16 * G::kLdW + ks * 16);
            mma_16816<kHalf>(o[2 * fp], pk[ks], {fb[0], fb[1]});
            mma_16816<kHalf>(o[2 * fp + 1], pk[ks], {fb[2], fb[3]});
          }
      }
    }
    if (e < s_events && slot == num_chunks - 1) {  // S complete: the epilogue of column block J
      const float* norm_j = norm_stage(jl);
      // K_ii = 1 exactly on the diagonal (svgd_step: left out, 0 or NaN for an invalid H; the finish at the end
      // adds score_i); only the blocks that hold it compare indices
      const bool diagonal = p.self && j0 < i0 + G::kRows && i0 < j0 + G::kCols;
      float kv[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int jj = nt * 8 + 2 * t + (r % 2);  // column within the block
          const float dot = norm_i[r / 2] + norm_j[jj] - 2.f * s[nt][r];
          const float dist = dot < 0.f ? 0.f : dot;  // a NaN kept for K (NaN as a key: 0; H is NaN then)
          const long long i = row_g + 8 * (r / 2);
          const long long j = j0 + jj;
          if constexpr (kMode == TileMode::kMedian) {
            if (i < p.a_rows && j < p.b_rows && j > i)
              radix_count(hist, key_of(dist > 0.f ? dist : 0.f), p.pass, prefix, same_prefix, 2u);
          } else {
            // padding columns have norm +inf: K = 0 there
            float k = exp2_of(dist * scale);
            if (diagonal && i == j) k = exp2_of(0.f * scale) - (kSvgd ? 1.f : 0.f);  // 1 (NaN for an invalid H)
            kv[nt][r] = k;
            if constexpr (kMode == TileMode::kRbf) {
              if (i < p.a_rows && j < p.b_rows) p.kernel[i * p.b_rows + j] = Store<Out>::from(k);
            }
          }
        }
      if constexpr (kSvgd) {
        auto pack_a = [](uint32_t(&frag)[4][4], const float(&v)[8][4]) {
#pragma unroll
          for (int ks = 0; ks < 4; ++ks) {  // accumulator tiles 2 ks, 2 ks + 1 -> A fragment of step ks
            frag[ks][0] = pack16<kHalf>(v[2 * ks][0], v[2 * ks][1]);
            frag[ks][1] = pack16<kHalf>(v[2 * ks][2], v[2 * ks][3]);
            frag[ks][2] = pack16<kHalf>(v[2 * ks + 1][0], v[2 * ks + 1][1]);
            frag[ks][3] = pack16<kHalf>(v[2 * ks + 1][2], v[2 * ks + 1][3]);
          }
        };
        pack_a(pk, kv);  // K_J, multiplied by W_J in the next event
        if (split) {  // K' = -(2/H) K as the dot takes it: the row sums below are those of these values
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) kv[nt][r] = to_float(bf16{bf16_bits(neg_a * kv[nt][r])});
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          rs[0] += kv[nt][0] + kv[nt][1];
          rs[1] += kv[nt][2] + kv[nt][3];
        }
        if (split) {  // O += K'_J B_J: B_J (particles x features f0.., row-major) as the B operand by ldmatrix.trans
          uint32_t px[4][4];
          pack_a(px, kv);
          const long long width = p.d_pad - f0 < G::kChunk ? p.d_pad - f0 : G::kChunk;
          const uint16_t* xs = b_stage(e) + a_ld_row * G::kLdChunk + a_ld_col;
#pragma unroll
          for (int ks = 0; ks < 4; ++ks)
#pragma unroll
            for (int fp = 0; fp < 8; ++fp) {  // feature tiles 2 fp and 2 fp + 1, those within d_pad
              if (16 * fp < width) {
                uint32_t fb[4];
                ldmatrix_x4<true>(fb, xs + ks * 16 * G::kLdChunk + fp * 16);
                mma_16816<kHalf>(o[2 * fp], px[ks], {fb[0], fb[1]});
                mma_16816<kHalf>(o[2 * fp + 1], px[ks], {fb[2], fb[3]});
              }
            }
        }
      }
    }
  }

  if constexpr (kSvgd) {
    // phi = (O / w_scale + c x_i + score_i) / n: c = (2/H) rowsum, x_i centred by the mean (folded; the own
    // term k_ii = 1 is score_i, added here: folded into W it would be (score_i - a xc_i) + a xc_i, whose two
    // large terms cancel when H lies far below the squared distances), or c = -(the row sums of K') and
    // x_i = b_i, the operand's values that K' B multiplied (split: K' = -(2/H) K)
    float c[2];
    for (int h = 0; h < 2; ++h) {
      float sum = rs[h];
      sum += shfl_xor(sum, 1);  // the four lanes of a quad share a row
      sum += shfl_xor(sum, 2);
      c[h] = split ? -sum : *p.repulsion * sum;
    }
    const float unscale = p.w_scale != nullptr ? 1.f / *p.w_scale : 1.f;  // a power of two: exact
    const float n = static_cast<float>(p.a_rows);
#pragma unroll
    for (int ft = 0; ft < 16; ++ft)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const long long i = row_g + 8 * (r / 2);
        const long long f = f0 + ft * 8 + 2 * t + (r % 2);
        if (i < p.a_rows && f < p.d) {
          const float x_i = split ? to_float(bf16{p.b[i * p.d_pad + f]}) : p.xc[i * p.d + f];
          const uint16_t s_i = p.score[i * p.d + f];
          const float score_i = kHalf ? to_float(f16{s_i}) : to_float(bf16{s_i});
          const float v = (o[ft][r] * unscale + c[r / 2] * x_i + score_i) / n;
          p.phi[i * p.d + f] = kHalf ? f16_bits(v) : bf16_bits(v);
        }
      }
  }
  if constexpr (kMode == TileMode::kMedian) {
    __syncthreads();
    flush_histogram(hist, p.hist);
  }
}

}  // namespace bmt_fast::cuda
