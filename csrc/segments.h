// A segment of a segmented FFN (mixed-task batch), as the CPU and CUDA kernels take it: one per
// segment holding rows, read from the (segments, kept_offsets) layout on the host by
// read_segment_layout (doe_kernels.h). Torch-free: the CUDA kernels read a table of them on the
// device.
#pragma once

#include <cstdint>

namespace doe_kernels {

struct Segment {
  int64_t r0, rows;  // rows [r0, r0 + rows) of x and out
  int64_t k0, kept;  // entries [k0, k0 + kept) of kept (and scales)
  int64_t hidden;    // offset of its (rows x kept) block in the packed hidden buffer
};

}  // namespace doe_kernels
