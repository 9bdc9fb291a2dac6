#pragma once
// Boxed kernels shared by every family's mutating operators (in-place, out=, optimizer
// steps), registered by name so each family lists its ops in one place.

#include <torch/library.h>

namespace pyops {

// ADInplaceOrView: redispatches, then bumps the version counter of every argument the
// schema marks as written (Tensor(a!)), as torch's own in-place ops do; autograd then
// notices a saved tensor that was modified.
torch::CppFunction bump_version_kernel();

// Autograd: for ops that record no gradient (out= variants, optimizer steps). Raises
// when grad mode is on and an input requires grad, like torch's out= ops.
torch::CppFunction not_differentiable_kernel();

}  // namespace pyops
