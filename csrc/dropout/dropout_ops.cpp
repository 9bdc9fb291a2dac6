// The dropout family's operators: schemas, checks, allocation and autograd, once for
// every device; the kernels are dropout_cpu.cpp and dropout_cuda.cu.

#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/memory.h"
#include "common/operators.h"
#include "common/layout.h"
#include "common/registration.h"
#include "dropout/dropout.h"

namespace pyops::dropout {

DispatchTable<DropoutForwardFn> forward_kernel("dropout forward");
DispatchTable<DropoutBackwardFn> backward_kernel("dropout backward");

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_probability(double p, const char* op) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op,
                    ": dropout probability has to be between 0 and 1, but got ", p);
}

std::tuple<Tensor, Tensor> dropout_impl(const Tensor& self, double p) {
  constexpr const char* op = "pyops.dropout";
  check_floating(self, "input", op);
  check_probability(p, op);
  Tensor input = dense(self);
  Tensor output = with_huge_pages(at::empty_like(input));
  Tensor mask =
      with_huge_pages(at::empty_like(input, input.options().dtype(at::kBool)));
  if (input.numel() > 0) forward_kernel(input.device().type())(input, p, output, mask);
  return {output, mask};
}

Tensor dropout_inplace_impl(const Tensor& self, double p) {
  constexpr const char* op = "pyops.dropout_";
  check_floating(self, "input", op);
  check_probability(p, op);
  check_writable(self, "input", op);
  Tensor work = self.is_non_overlapping_and_dense() ? self : self.contiguous();
  Tensor mask =
      with_huge_pages(at::empty_like(work, work.options().dtype(at::kBool)));
  if (work.numel() > 0) forward_kernel(work.device().type())(work, p, work, mask);
  if (!work.is_same(self)) self.copy_(work);  // never leave the result in a dropped copy
  return mask;
}

Tensor dropout_backward_impl(const Tensor& grad_output, const Tensor& mask, double p) {
  constexpr const char* op = "pyops._dropout_backward";
  check_floating(grad_output, "grad_output", op);
  check_probability(p, op);
  check_defined(mask, "mask", op);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": expected mask to have dtype bool, got ",
                   mask.scalar_type());
  check_same_device(mask, "mask", grad_output, "grad_output", op);
  check_same_shape(mask, "mask", grad_output, "grad_output", op);
  Tensor mask_dense = dense(mask);
  Tensor grad = dense_like(grad_output, mask_dense);
  Tensor grad_input = with_huge_pages(at::empty_like(grad));
  if (grad.numel() > 0) backward_kernel(grad.device().type())(grad, mask_dense, p, grad_input);
  return grad_input;
}

Tensor call_backward(const Tensor& grad, const Tensor& mask, double p) {
  static auto op = op_handle<Tensor(const Tensor&, const Tensor&, double)>("pyops::_dropout_backward");
  return op.call(grad, mask, p);
}

struct DropoutFunction : torch::autograd::Function<DropoutFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& self, double p) {
    static auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&, double)>("pyops::dropout");
    std::tuple<Tensor, Tensor> result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = op.call(self, p);
    }
    const Tensor& mask = std::get<1>(result);
    ctx->mark_non_differentiable({mask});
    ctx->save_for_backward({mask});
    ctx->saved_data["p"] = p;
    return {std::get<0>(result), mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_backward(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble()),
            Tensor()};
  }
};

struct DropoutInplaceFunction : torch::autograd::Function<DropoutInplaceFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& self, double p) {
    static auto op = op_handle<Tensor(const Tensor&, double)>("pyops::dropout_");
    Tensor mask;
    {
      at::AutoDispatchBelowAutograd guard;  // through ADInplaceOrView: bumps the version
      mask = op.call(self, p);
    }
    ctx->mark_dirty({self});
    ctx->mark_non_differentiable({mask});
    ctx->save_for_backward({mask});
    ctx->saved_data["p"] = p;
    return {self, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_backward(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble()),
            Tensor()};
  }
};

// d(grad * mask * scale)/d(grad) is the same map: double backward re-applies the mask.
struct DropoutBackwardFunction : torch::autograd::Function<DropoutBackwardFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad, const Tensor& mask, double p) {
    Tensor grad_input;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_input = call_backward(grad, mask, p);
    }
    ctx->save_for_backward({mask});
    ctx->saved_data["p"] = p;
    return grad_input;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_backward(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble()),
            Tensor(), Tensor()};
  }
};

// Autograd-key kernels; without a gradient to record they go straight to the device.

std::tuple<Tensor, Tensor> dropout_autograd(const Tensor& self, double p) {
  if (!any_requires_grad({&self})) {
    static auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&, double)>("pyops::dropout");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(self, p);
  }
  auto outputs = DropoutFunction::apply(self, p);
  return {outputs[0], outputs[1]};
}

Tensor dropout_inplace_autograd(const Tensor& self, double p) {
  if (!any_requires_grad({&self})) {
    static auto op = op_handle<Tensor(const Tensor&, double)>("pyops::dropout_");
    at::AutoDispatchBelowAutograd guard;
    return op.call(self, p);
  }
  return DropoutInplaceFunction::apply(self, p)[1];
}

Tensor dropout_backward_autograd(const Tensor& grad, const Tensor& mask, double p) {
  if (!any_requires_grad({&grad})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_backward(grad, mask, p);
  }
  return DropoutBackwardFunction::apply(grad, mask, p);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyops, m) {
  // The mask is returned (bool, one byte per element) so autograd can save it.
  m.def("dropout(Tensor input, float p) -> (Tensor output, Tensor mask)");
  m.def("dropout_(Tensor(a!) input, float p) -> Tensor mask");
  m.def("_dropout_backward(Tensor grad_output, Tensor mask, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("dropout", dropout_impl);
  m.impl("dropout_", dropout_inplace_impl);
  m.impl("_dropout_backward", dropout_backward_impl);
}

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("dropout", dropout_impl);
  m.impl("dropout_", dropout_inplace_impl);
  m.impl("_dropout_backward", dropout_backward_impl);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  m.impl("dropout", dropout_autograd);
  m.impl("dropout_", dropout_inplace_autograd);
  m.impl("_dropout_backward", dropout_backward_autograd);
}

TORCH_LIBRARY_IMPL(pyops, ADInplaceOrView, m) {
  m.impl("dropout_", bump_version_kernel());
}

}  // namespace pyops::dropout
