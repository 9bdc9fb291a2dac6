"""Fake kernels of the optimizer family."""

from torch._subclasses.fake_tensor import FakeTensor

from pyops._fake._register import register_fake


def _count_steps(state_steps):
    # Optimizer steps mutate their arguments in place and return nothing. Called on the
    # Meta key with meta params, the step counts (real CPU tensors) still advance, as
    # they do in torch's optimizers; fake ones (torch.compile) are left alone.
    for step in state_steps:
        if not isinstance(step, FakeTensor) and step.device.type == "cpu":
            step.add_(1)


register_fake("pyops::sgd_")(lambda *args, **kwargs: None)
register_fake("pyops::adagrad_")(
    lambda params, grads, state_sums, state_steps, **kwargs: _count_steps(state_steps))
register_fake("pyops::adadelta_")(
    lambda params, grads, square_avgs, acc_deltas, state_steps, **kwargs:
    _count_steps(state_steps))
register_fake("pyops::rmsprop_")(
    lambda params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, **kwargs:
    _count_steps(state_steps))
register_fake("pyops::adam_")(
    lambda params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs:
    _count_steps(state_steps))
