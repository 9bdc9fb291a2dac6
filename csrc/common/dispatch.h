#pragma once
// Per-device kernel tables: the op implementations (checks, allocation, autograd) are
// written once per op and call `table(device)`; each *_cpu.cpp compiled for a CPU
// capability and each *_cuda.cu registers its kernel into the table at load time.
// Like ATen's DispatchStub, but small and independent of ATen's internal build macros.

#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

namespace pyops {

// Order matters: a higher value may use the instructions of every lower one.
enum class CpuCapability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr int kNumCpuCapabilities = 3;

// The capability pyops' CPU kernels run with: torch's own choice (which honours
// ATEN_CPU_CAPABILITY and the CPU's features), capped by what this build compiled.
CpuCapability cpu_capability();
const char* cpu_capability_name(CpuCapability capability);

template <typename Fn>
class DispatchTable {
 public:
  constexpr explicit DispatchTable(const char* name) : name_(name) {}

  void register_cpu(CpuCapability capability, Fn fn) {
    cpu_[static_cast<int>(capability)] = fn;
  }
  void register_cuda(Fn fn) { cuda_ = fn; }

  Fn operator()(c10::DeviceType device) const {
    if (device == c10::DeviceType::CPU) {
      for (int c = static_cast<int>(cpu_capability()); c >= 0; --c) {
        if (cpu_[c] != nullptr) return cpu_[c];
      }
      TORCH_CHECK(false, "pyops: no CPU kernel registered for ", name_);
    }
    if (device == c10::DeviceType::CUDA) {
      TORCH_CHECK(cuda_ != nullptr, "pyops: ", name_,
                  " has no CUDA kernel: this pyops build was compiled without CUDA "
                  "(see pyops.build_info())");
      return cuda_;
    }
    TORCH_CHECK(false, "pyops: ", name_, " supports CPU and CUDA tensors, got device ",
                c10::DeviceTypeName(device));
  }

 private:
  const char* name_;
  Fn cpu_[kNumCpuCapabilities] = {};
  Fn cuda_ = nullptr;
};

namespace detail {
template <typename Table, typename Fn>
bool register_cpu_kernel(Table& table, CpuCapability capability, Fn fn) {
  table.register_cpu(capability, fn);
  return true;
}
template <typename Table, typename Fn>
bool register_cuda_kernel(Table& table, Fn fn) {
  table.register_cuda(fn);
  return true;
}
}  // namespace detail

}  // namespace pyops

#define PYOPS_CONCAT_INNER(a, b) a##b
#define PYOPS_CONCAT(a, b) PYOPS_CONCAT_INNER(a, b)

// In a *_cpu.cpp file (compiled once per CPU_CAPABILITY).
#define PYOPS_REGISTER_CPU_KERNEL(table, fn)                                         \
  static const bool PYOPS_CONCAT(pyops_cpu_kernel_registered_, __LINE__) =           \
      ::pyops::detail::register_cpu_kernel(table, ::pyops::CpuCapability::CPU_CAPABILITY, fn)

// In a *_cuda.cu file.
#define PYOPS_REGISTER_CUDA_KERNEL(table, fn)                               \
  static const bool PYOPS_CONCAT(pyops_cuda_kernel_registered_, __LINE__) = \
      ::pyops::detail::register_cuda_kernel(table, fn)
