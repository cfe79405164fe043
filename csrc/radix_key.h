// The radix median's keys, shared by the CPU and CUDA kernels: the unsigned integer of a floating type's
// width, whose bit patterns order non-negative values (the squared distances) as the values themselves.
#pragma once

#include <cstdint>

namespace bmt_fast {

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

}  // namespace bmt_fast
