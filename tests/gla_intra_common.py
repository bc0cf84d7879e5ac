"""What tests/test_gla_intra_kernel.py and tests/test_gla_fwd_intra_kernel.py share (no triton import here: they set
the interpreter up before importing it)."""
import pytest
import torch

EPS = torch.finfo(torch.float32).eps
slow = pytest.mark.slow  # runs FLA's kernels under the interpreter (pytest.ini)
# numpy's overflow warnings from values the kernels compute and then mask (rows past T, entries above the diagonal,
# factors the fast path does not use)
overflow_ok = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                         "ignore:invalid value encountered:RuntimeWarning")


def extreme_x(B, T, H, K):
    """Pre-activations: -1000 (a log2 decay of ~-90 a step) in the second sub-chunk of every chunk on half the
    channels, 1e4 (decay exactly 0) on a quarter, random elsewhere."""
    x = torch.randn(B, T, H, K, generator=torch.Generator().manual_seed(5))
    rows = (torch.arange(T) % 64) // 16 == 1
    x[:, rows, :, : K // 2] = -1000.0
    x[:, :, :, K // 2: K // 2 + K // 4] = 1e4
    return x
