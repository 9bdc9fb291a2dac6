#pragma once
// Autocast (torch.autocast) for pyops' operators, with torch's policy for their native
// twins: convolutions and linear layers run in the autocast dtype ("lower precision":
// bfloat16 on CPU by default, float16 on CUDA), everything else takes its inputs as they
// come (the dispatcher falls through). Without these kernels a pyops convolution in an
// autocast region would run in float32, and one fed a bfloat16 activation from a native
// layer next to a float32 weight would reject the mixed dtypes that the native layer takes.
//
// The kernel casts every floating tensor argument on the region's device with ATen's
// cached_cast (the cast of a leaf weight is cached for the region, as torch's are) and
// calls the operator again below the autocast key; the casts are differentiable, so
// gradients reach the float32 weights.

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "common/operators.h"

namespace pyops {

template <c10::DeviceType Device, typename Signature, const char* Name>
struct LowerPrecisionAutocast;

template <c10::DeviceType Device, typename Ret, typename... Args, const char* Name>
struct LowerPrecisionAutocast<Device, Ret(Args...), Name> {
  static Ret call(Args... args) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(Device));
    static auto op = op_handle<Ret(Args...)>(Name);
    const at::ScalarType dtype = at::autocast::get_autocast_dtype(Device);
    return op.call(at::autocast::cached_cast(dtype, args, Device)...);
  }
};

// The AutocastCPU / AutocastCUDA kernel of operator `Name` (a namespace-scope
// `constexpr char[]` holding e.g. "pyops::conv2d") of signature `Signature`.
template <c10::DeviceType Device, typename Signature, const char* Name>
constexpr auto lower_precision_autocast = &LowerPrecisionAutocast<Device, Signature, Name>::call;

}  // namespace pyops
