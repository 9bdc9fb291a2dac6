#pragma once
// What every family's autograd kernels share: calling pyops operators through the
// dispatcher (so fake tensors, functionalization and double backward see each step),
// and deciding whether a call has a gradient to record.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#include <initializer_list>

namespace pyops {

// The typed handle of operator `name` (e.g. "pyops::relu"); look it up once per call
// site (`static auto op = op_handle<...>(...)`).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Signature>();
}

// True when grad mode is on and a defined tensor among `tensors` requires grad.
inline bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

}  // namespace pyops
