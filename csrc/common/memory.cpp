#include "common/memory.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyops {
namespace {

constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;

bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* flag = std::getenv("PYOPS_HUGE_PAGES");
    return flag == nullptr || std::strcmp(flag, "0") != 0;
  }();
  return enabled;
}

}  // namespace

at::Tensor with_huge_pages(at::Tensor fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (fresh.device().is_cpu() && fresh.nbytes() >= static_cast<size_t>(kHugePageMinBytes) &&
      huge_pages_enabled()) {
    const auto begin = reinterpret_cast<std::uintptr_t>(fresh.storage().data());
    const std::uintptr_t end = begin + fresh.storage().nbytes();
    const std::uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const std::uintptr_t last = end & ~(kHugePage - 1);
    // Advice only: a refusal (THP off, an old kernel) leaves ordinary pages behind.
    if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return fresh;
}

}  // namespace pyops
