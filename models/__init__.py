"""FLA language models: build from a JSON config, run on CPU (GLA as plain PyTorch ops, models/cpu_torch.py, or FLA's
Triton kernels under the interpreter, models/cpu_triton.py), count parameters and FLOPs."""
