"""Helpers shared by the kernel test modules (test_cpp_kernels, test_cuda_kernels, test_cuda_math):
bit-level comparison of tensors and the special-value input every backend's quantizer must treat
as the reference does."""

import torch


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns of a float tensor (any other dtype as is), so that equality means bitwise
    identity: -0.0 != 0.0 and NaN payloads are compared."""
    if not t.is_floating_point():
        return t
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal_nan(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality, except that a NaN only has to meet a NaN (the contract leaves its bits open)."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan_a, nan_e = torch.isnan(actual.float()), torch.isnan(expected.float())
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    diff = (bits_of(actual) != bits_of(expected)) & ~nan_a
    if diff.any():
        idx = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(diff.sum())} differ, first at {idx}: {actual[idx]} vs {expected[idx]}")


def special_values() -> torch.Tensor:
    """(12, 64) fp32: NaN, ±Inf, ±0, constant rows, a range whose max − min overflows, subnormals,
    single-sign rows; one row per case, so groups of up to 64 hold one case each."""
    nan, inf = float("nan"), float("inf")
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    x[0, 3] = nan
    x[1] = 0.0
    x[1, ::3] = -0.0
    x[2] = 5.0
    x[3, 7] = inf
    x[4, 9] = -inf
    x[5, :2] = torch.tensor([inf, -inf])
    x[6] = 3e38 * torch.sign(x[6])  # max - min overflows to inf
    x[7] *= 1e-40  # subnormal: no flush to zero
    x[8] = x[8].abs() + 1
    x[9] = -x[9].abs()
    x[10, 5], x[10, 6] = nan, inf
    x[11, 40] = -nan
    return x
