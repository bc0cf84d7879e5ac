"""Our own Triton kernels for GPU training, where FLA's are slower than the memory traffic allows (issue 10).

Import the submodules directly (`from models.kernels.rmsnorm import rms_norm`): this package imports nothing, so
that importing `models` never pulls in triton before `models.cpu_triton.enable()` has had its chance to run.
"""
import os

# True only inside models/kernels/compile_check.py: CPU tensors then take the kernels' path, and each launch compiles
# the kernel for a GPU without running it
COMPILE_ONLY = False


def runs_triton(t) -> bool:
    """Whether tensor t takes our Triton kernels (else the PyTorch reference or FLA's function): on a GPU, on a CPU
    under the Triton interpreter (the tests), or in the compile check."""
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or COMPILE_ONLY
