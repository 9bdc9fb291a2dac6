#include "common/registration.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

#include <vector>

namespace pyops {
namespace {

std::vector<at::Tensor> written_arguments(const c10::OperatorHandle& op,
                                          const torch::jit::Stack& stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack.size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = stack[first + i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) written.push_back(t);
    }
  }
  return written;
}

void bump_version_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  std::vector<at::Tensor> written = written_arguments(op, *stack);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::increment_version(t);
}

bool requires_grad(const c10::IValue& value) {
  if (value.isTensor()) return value.toTensor().requires_grad();
  if (value.isTensorList()) {
    for (const at::Tensor& t : value.toTensorList()) {
      if (t.defined() && t.requires_grad()) return true;
    }
  }
  return false;
}

void not_differentiable_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                              torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  if (c10::GradMode::is_enabled()) {
    const size_t first = stack->size() - schema.arguments().size();
    for (size_t i = 0; i < schema.arguments().size(); ++i) {
      TORCH_CHECK(!requires_grad((*stack)[first + i]), "pyops.", schema.name().substr(7),
                  (schema.overload_name().empty() ? "" : "." + schema.overload_name()),
                  ": argument '", schema.arguments()[i].name(),
                  "' requires grad, but this operator records no gradient (out= variants and "
                  "optimizer steps); call it under torch.no_grad() or pass tensors that do not "
                  "require grad");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

}  // namespace

torch::CppFunction bump_version_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&bump_version_boxed>();
}

torch::CppFunction not_differentiable_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&not_differentiable_boxed>();
}

}  // namespace pyops
