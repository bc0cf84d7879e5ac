"""`python -m trainer.generate PATH [PROMPT ...]`: text from a trained model, on a GPU or a CPU.

PATH is an export (`python -m trainer.export`'s OUT, or any FLA model directory with config.json and a
tokenizer.json), a run's out_dir (its latest checkpoint) or one checkpoint directory (OUT/ckpt/step-N, s3://...).
Each PROMPT is continued as the start of a document, the way the shards hold one: BOS first where the data has
one, else the EOS that ends the previous document in packed data. Greedy by default (--temperature 0); with
--temperature T > 0 it samples (--top-k, --seed). Generation stops at the data's EOS or after --max-new-tokens.

On a CPU it runs FLA's Triton kernels under the interpreter, and a GLA's chunked ops as PyTorch
(models/cpu_torch.py); where flash-attn is absent, softmax attention goes through PyTorch's SDPA.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from models import cpu_triton
from shards.errors import UserError

log = logging.getLogger("trainer.generate")


class GenerateError(UserError):
    pass


def pick_device(name: str | None) -> torch.device:
    """--device: the named device where this machine has it, else a GenerateError naming the fix (torch's own error
    for a CUDA device on a machine without one is an AssertionError deep in a 30-line traceback). None: cuda where
    there is one, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name}: not a device name; use cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GenerateError(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False); "
                                f"use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise GenerateError(f"--device {name}: this machine has {count} CUDA device{'' if count == 1 else 's'} "
                                f"(cuda:0 to cuda:{count - 1}); use one of those or --device cpu")
    elif device.type != "cpu":
        backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise GenerateError(f"--device {name}: no {device.type} device here; use --device cpu")
    return device


def prepare(path: str, device_name: str | None) -> torch.device:
    """The start the model CLIs share (generate, trainer.evaluate): the device (pick_device), the Triton interpreter
    switched on for a CPU (before FLA first imports triton), and PATH checked to exist."""
    device = pick_device(device_name)
    if device.type == "cpu":
        cpu_triton.enable()
    if not os.path.exists(path) and "://" not in path:
        raise GenerateError(f"{path} does not exist: give an export directory, a run's out_dir or a checkpoint "
                            f"directory")
    return device


def _is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "model.json"))


def load(path: str, device: torch.device):
    """(model in eval mode on `device`, tokenizers.Tokenizer, eos id, bos id or None) for PATH (module doc)."""
    from tokenizers import Tokenizer
    from models import build
    if _is_export(path):
        build.import_fla()  # registers FLA's model types with transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # a bar for reading one small file is noise before the text
        model = AutoModelForCausalLM.from_pretrained(path)
        tok_dir = path
        eos, bos = model.config.eos_token_id, model.config.bos_token_id
    else:
        from trainer.export import load_checkpoint_model
        model, tok_dir, _ = load_checkpoint_model(path)
        with open(os.path.join(tok_dir, "data.json")) as f:
            data = json.load(f)
        eos, bos = data["eos_id"], data.get("bos_id")
        build.use_data_special_tokens(model.config, eos, bos, model.generation_config)
    tok_file = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise GenerateError(f"{tok_file} does not exist: the model has no tokenizer to read prompts with (the shards "
                            f"were built without one); copy the tokenizer.json the shards were made with there")
    if isinstance(eos, list):
        eos = eos[0]
    build.adapt_to_device(model.config, device)
    if device.type == "cpu":
        from models import cpu_torch, sdpa_attention
        if cpu_torch.unsupported_reason(model.config) is None:
            cpu_torch.install()
        sdpa_attention.install()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), Tokenizer.from_file(tok_file), eos, bos


def generate(model, tok, eos: int, bos: int | None, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> str:
    """The continuation of `prompt` (the new text only)."""
    device = next(model.parameters()).device
    start = [bos] if bos is not None else [eos] if eos is not None else []  # a model dir may name neither
    ids = start + tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise GenerateError("an empty prompt, and the model names no BOS or EOS to start from: give a prompt")
    x = torch.tensor([ids], device=device)
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "eos_token_id": eos,
              "pad_token_id": eos, "attention_mask": torch.ones_like(x)}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or None)
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(x, **kwargs)[0, len(ids):].tolist()
    if out and eos is not None and out[-1] == eos:
        out = out[:-1]
    return tok.decode(out)


def prompt_header(i: int, n: int, prompt: str) -> str:
    """The line before the i-th of n prompts' outputs (several prompts only): the prompt as a JSON string, so that
    one holding newlines or spaces at its ends shows them."""
    return f"--- prompt {i}/{n}: {json.dumps(prompt, ensure_ascii=False)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.generate", description="Continue prompts with a trained model.")
    p.add_argument("path", help="an export dir, a run's out_dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("prompts", nargs="*", default=["To be"], help="texts to continue (default: 'To be')")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda where there is one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        print("error: --max-new-tokens must be >= 1, --temperature and --top-k >= 0", file=sys.stderr)
        return 1
    try:
        device = prepare(args.path, args.device)
        model, tok, eos, bos = load(args.path, device)
        for i, prompt in enumerate(args.prompts, 1):
            text = generate(model, tok, eos, bos, prompt, args.max_new_tokens, args.temperature, args.top_k,
                            args.seed)
            if len(args.prompts) > 1:  # where each output starts: a small model's text is often blank lines
                print(prompt_header(i, len(args.prompts), prompt), flush=True)
            print(prompt + text, flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
