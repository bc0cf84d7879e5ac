"""Our own Triton kernels for GPU training, where FLA's are slower than the memory traffic allows (issue 10).

Import the submodules directly (`from models.kernels.rmsnorm import rms_norm`): this package imports nothing, so
that importing `models` never pulls in triton before `models.cpu_triton.enable()` has had its chance to run.
"""
