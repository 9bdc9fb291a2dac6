#pragma once
// Fresh outputs for kernels that write every element.

#include <ATen/core/Tensor.h>

namespace pyops {

// `fresh`, a just-allocated tensor that a kernel is about to write in full, with its
// large CPU allocations advised to the kernel as huge-page memory before the first touch.
//
// Why: a streaming op into a fresh output spends most of its time in page faults, one per
// 4 KB page (relu on 16M float32 here: 14 ms into a fresh tensor, 4 ms with the output's
// memory faulted in 2 MB at a time). torch does the same for every allocation under
// THP_MEM_ALLOC_ENABLE=1; pyops does it only for the outputs it allocates itself, of
// kHugePageMinBytes or more, on Linux with transparent huge pages in "madvise" or
// "always" mode. PYOPS_HUGE_PAGES=0 turns it off. Values are never affected.
at::Tensor with_huge_pages(at::Tensor fresh);

// Below this, the 2 MB-aligned interior of an allocation is too small to matter.
constexpr int64_t kHugePageMinBytes = int64_t{4} << 20;

}  // namespace pyops
