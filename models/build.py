"""Build an FLA causal LM from a model JSON (the format of configs/*.json and of HF config.json).

Three ways to get weights:
  * `build_model(config, device)`: the model's own random init, on `device`.
  * meta first (`build_model(config, "meta")`, then shard, then `materialize(model, device)`): for FSDP,
    so that no rank ever holds a full copy; FLA's init is DTensor-aware, so it runs on the shards.
  * `load_pretrained(path, device)`: an HF directory (our export or any FLA model dir).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from shards.errors import NotFoundError, UserError

log = logging.getLogger(__name__)


class ModelConfigError(UserError, ValueError):
    """A model JSON that cannot be built. Names the file and the key."""


def import_fla():
    """Import fla (registers its configs/models with transformers) and our SDPA attention for the transformer."""
    import fla  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM entries)
    from models import sdpa_attention
    sdpa_attention.install()


def read_model_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise NotFoundError(f"model config {path} not found (model.config names a JSON like configs/gla_340M.json)") from None
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"model config {path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ModelConfigError(f"model config {path}: no \"model_type\" key (e.g. \"gla\", \"transformer\", \"mamba2\")")
    return d


def load_config(path_or_dict, vocab_size: int | None = None):
    """A transformers config object for an FLA model from a JSON file (or dict)."""
    import_fla()
    from transformers import AutoConfig
    d = dict(read_model_json(path_or_dict) if isinstance(path_or_dict, str) else path_or_dict)
    where = path_or_dict if isinstance(path_or_dict, str) else "model config"
    model_type = d.pop("model_type")
    d.pop("transformers_version", None)
    try:
        config = AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise ModelConfigError(f"{where}: model_type {model_type!r} is not an FLA/transformers model ({e})") from None
    if vocab_size is not None and config.vocab_size < vocab_size:
        raise ModelConfigError(f"{where}: vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                         f"set vocab_size >= {vocab_size} in the model JSON")
    return config


def use_data_special_tokens(config, eos_id: int, bos_id: int | None, generation_config=None) -> None:
    """The shards' tokenizer is the one truth for special ids: the model JSON's (e.g. FLA's eos 2, bos 1) name
    other tokens in another vocabulary, and generate() stops at the config's EOS. pad_token_id stays as the model
    JSON has it: FLA models pass it to nn.Embedding as padding_idx, which would freeze the EOS embedding in
    training; generation pads with EOS through `generation_config` instead."""
    config.eos_token_id, config.bos_token_id = eos_id, bos_id
    if generation_config is not None:
        generation_config.eos_token_id, generation_config.bos_token_id = eos_id, bos_id
        generation_config.pad_token_id = eos_id


def adapt_to_device(config, device: torch.device) -> None:
    """Switch off fused kernels that cannot run on `device`. Changes the in-memory config only, with one log line."""
    if device.type == "cpu" and getattr(config, "fuse_cross_entropy", False):
        config.fuse_cross_entropy = False
        log.info("CPU: fuse_cross_entropy switched off (FLA's fused cross entropy needs a GPU); "
                 "the model file is unchanged")


def build_model(config, device: str | torch.device = "cpu", seed: int = 0):
    """A freshly initialized model. On "meta", only shapes: call `materialize` after sharding."""
    import_fla()
    from transformers import AutoModelForCausalLM
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)


class Fp32CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss over fp32 logits (bf16 ones are cast first; fp32 ones pass as they are). See use_fp32_loss."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input.float(), target)


def use_fp32_loss(model) -> bool:
    """Where an FLA model's loss is the unfused nn.CrossEntropyLoss (fuse_cross_entropy off: on a CPU, or a model JSON
    without it), compute it over fp32 logits: on bf16 weights (train.precision=bf16) the logits are bf16, and that
    loss would come back rounded to bf16 (steps of 1/16 at a loss of 10) with its gradient computed in bf16. FLA's
    forward takes `model.criterion` where one is set; it holds no state (checkpoints and exports are unchanged).
    Returns whether it was set; fused losses (FLA's kernels compute in fp32) and other models are left alone."""
    config = model.config
    if (getattr(model, "criterion", False) is not None or getattr(config, "fuse_cross_entropy", False)
            or getattr(config, "fuse_linear_cross_entropy", False)):
        return False
    model.criterion = Fp32CrossEntropyLoss()
    return True


def materialize(model, device: torch.device, seed: int = 0) -> None:
    """Allocate a meta model (plain or FSDP-sharded) on `device` and run the model's own init on it."""
    torch.manual_seed(seed)
    model.to_empty(device=device)
    for module in model.modules():
        # to_empty gave new storage: forget "already initialized" marks so the model's init runs everywhere.
        if hasattr(module, "_is_hf_initialized"):
            module._is_hf_initialized = False
    model.initialize_weights()  # FLA's _init_weights; it calls reset_parameters() for norms and rotary buffers
    for module in model.modules():
        if type(module).__name__ == "RotaryEmbedding" and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # non-persistent buffer, not a parameter: be explicit
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def check_pretrained_fits(path: str, vocab_size: int | None, data_tokenizer: bytes | None, data_where: str) -> None:
    """model.init_from must fit the shards, checked before its weights load: an embedding table that holds
    their ids, and, where the directory has a tokenizer.json, the shards' tokenizer (the same id for the same
    token; an export re-serializes the file, so the vocabularies are compared, not the bytes)."""
    fix = (f"start from a model trained with the shards' tokenizer, or rebuild the shards with this model's "
           f"(python -m shardgen ... --tokenizer {path})")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise NotFoundError(f"model.init_from={path}: no config.json there; give an HF model directory "
                            f"(e.g. one written by `python -m trainer.export`)")
    model_vocab = read_model_json(config_file).get("vocab_size")
    if vocab_size is not None and isinstance(model_vocab, int) and model_vocab < vocab_size:
        raise ModelConfigError(f"model.init_from={path}: vocab_size {model_vocab} is smaller than the {vocab_size} "
                               f"token ids of the shards' tokenizer ({data_where}): {fix}")
    tok_file = os.path.join(path, "tokenizer.json")
    if data_tokenizer is None or not os.path.isfile(tok_file):
        return
    with open(tok_file, "rb") as f:
        theirs = f.read()
    if theirs == data_tokenizer:
        return
    from tokenizers import Tokenizer
    try:
        a = Tokenizer.from_str(data_tokenizer.decode()).get_vocab()
        b = Tokenizer.from_str(theirs.decode()).get_vocab()
    except Exception as e:  # tokenizers raises a bare Exception on a file it cannot read
        raise ModelConfigError(f"model.init_from={path}: {tok_file} is not a tokenizer that `tokenizers` reads ({e})") from None
    differ = vocab_difference(a, b)
    if differ:
        raise ModelConfigError(f"model.init_from={path}: its tokenizer.json is not the shards' tokenizer "
                               f"({data_where}): {differ}, so its embeddings would be trained on other meanings: "
                               f"{fix}")


def vocab_difference(data_vocab: dict[str, int], model_vocab: dict[str, int]) -> str | None:
    """None where the two vocabularies give every id the same token, else how they differ, e.g. "3 ids name other
    tokens (id 7 is 'a' in the shards, 'b' in the model)"."""
    if data_vocab == model_vocab:
        return None
    data_tok, model_tok = {i: t for t, i in data_vocab.items()}, {i: t for t, i in model_vocab.items()}
    differ = sorted(i for i in set(data_tok) | set(model_tok) if data_tok.get(i) != model_tok.get(i))
    i = differ[0]
    return (f"{len(differ)} ids name other tokens (id {i} is {data_tok.get(i)!r} in the shards, "
            f"{model_tok.get(i)!r} in the model)")


def load_pretrained(path: str, device: str | torch.device = "cpu"):
    """An HF model directory (config.json + weights) -> model on `device`, in fp32."""
    import_fla()
    from transformers import AutoModelForCausalLM
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise NotFoundError(f"model.init_from={path}: no config.json there; give an HF model directory "
                            f"(e.g. one written by `python -m trainer.export`)")
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device)


def count_parameters(model, exclude_embeddings: bool = False) -> int:
    """Unique parameters (tied weights once). With exclude_embeddings, the input embedding table is left out."""
    seen, total = set(), 0
    emb = model.get_input_embeddings().weight if exclude_embeddings else None
    for p in model.parameters():
        if id(p) in seen or p is emb:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
