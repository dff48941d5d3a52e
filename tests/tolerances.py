"""The test suite's one tolerance policy.

TOL: dtype -> (atol, rtol) for elementwise comparisons of a kernel against its reference computed
in the same dtype. For attention and norms we also apply the rule used by flash-attention: the
kernel's error against an fp32 reference may be at most ERR_FACTOR x PyTorch's own error in the
same dtype (plus a floor for exact cases).
"""
import torch

TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
ERR_FACTOR = 2.0
ERR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, msg: str = ""):
    """Elementwise closeness with the table's (atol, rtol) for `dtype` (default: expected's dtype)."""
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=msg or None)


def assert_error_within_torch(actual: torch.Tensor, torch_same_dtype: torch.Tensor, fp32_ref: torch.Tensor,
                              dtype: torch.dtype):
    """max|actual - ref32| <= ERR_FACTOR * max|torch_same_dtype - ref32| + floor."""
    ours = (actual.float() - fp32_ref.float()).abs().max().item()
    theirs = (torch_same_dtype.float() - fp32_ref.float()).abs().max().item()
    bound = ERR_FACTOR * theirs + ERR_FLOOR[dtype]
    assert ours <= bound, f"kernel error {ours:.3g} > {ERR_FACTOR} x torch's {theirs:.3g} + floor ({dtype})"

