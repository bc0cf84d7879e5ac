"""FLA language models: build from a JSON config, run on CPU (Triton interpreter), count parameters and FLOPs."""
