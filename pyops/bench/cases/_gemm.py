"""The check shared by the families whose ops are GEMMs (conv, linear). Not a family:
its name starts with an underscore."""

import torch

# Relative tolerance per dtype. pyops and native sum the same products in different
# orders (tiles, threads, im2col vs direct): in float32 the results differ by ~1e-6 of
# the largest term, 1e-4 leaves room and still catches a wrong kernel (a wrong tap, a
# skipped tail, a missing bias), which is off by whole terms.
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
         torch.bfloat16: 5e-2}
# A pre-activation within rounding of 0 may take the other side of relu's kink in one of
# the two, moving a few gradient entries by a whole term: in float16/bfloat16, where
# rounding is coarse, this share of the entries may differ.
_KINK_SHARE = 1e-4


def _tensors(result):
    return result if isinstance(result, (tuple, list)) else (result,)


def check(dtype, kinked=False):
    """(pyops result, native result) -> None, for a tensor or a tuple of tensors.

    Each tensor's absolute tolerance scales with its largest magnitude: a gradient sums
    many terms (a weight gradient N*H*W of them), so its rounding grows with it.
    ``kinked``: the results went through relu's gradient (see _KINK_SHARE).
    """
    rtol = _RTOL[dtype]
    loose = kinked and dtype in (torch.float16, torch.bfloat16)

    def compare(actual, expected):
        actual, expected = _tensors(actual), _tensors(expected)
        assert len(actual) == len(expected), (len(actual), len(expected))
        for a, e in zip(actual, expected):
            scale = max(1.0, e.detach().abs().max().item()) if e.numel() else 1.0
            atol = rtol * scale
            if loose:
                assert a.shape == e.shape, (a.shape, e.shape)
                far = ~torch.isclose(a.detach(), e.detach(), rtol=rtol, atol=atol)
                assert far.sum() <= _KINK_SHARE * far.numel(), (
                    f"{int(far.sum())} of {far.numel()} differ")
            else:
                torch.testing.assert_close(a, e, rtol=rtol, atol=atol)

    return compare
