"""The tokenizer: find it, pick its separator tokens, train one.

TOK is a tokenizer.json, a directory holding one (a tokenizer_config.json beside it names the EOS
and BOS tokens), or a Hugging Face hub name (downloaded through huggingface_hub when the hub is
reachable). Documents are encoded with `add_special_tokens=False` and with special-token matching
off: a document that contains the text "<|endoftext|>" gets ordinary tokens for it, so the only
separators in the stream are the ones shardgen inserts.

Engines: `tokenizers` is the truth. A byte-level BPE that converts exactly (shardgen/fastbpe.py) is
run by tiktoken instead, several times faster, once `choose_engine` has found the same tokens on a
set of hard strings and the input's first documents; the shards are the same bytes either way.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from shards.errors import UserError
from shards.format import TOKENIZER_NAME, dtype_for_vocab

CONFIG_NAME = "tokenizer_config.json"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
TRAINED_EOS = "<|endoftext|>"
ENGINES = ("auto", "hf")  # --tokenizer-engine: auto takes the exact fast path where there is one


class TokenizerError(UserError):
    """A tokenizer that cannot be found or used; the message says which and what to do."""


@dataclass(frozen=True)
class TokenizerInfo:
    source: str
    json_text: str
    sha256: str
    vocab_size: int
    eos_token: str
    eos_id: int
    bos_token: str | None
    bos_id: int | None
    encoder: Tokenizer | None = field(default=None, compare=False, repr=False)  # make_encoder's, loaded once

    @property
    def dtype(self) -> str:
        return dtype_for_vocab(self.vocab_size)

    def manifest_entry(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_token": self.eos_token, "bos_token": self.bos_token}


def make_encoder(json_text: str) -> Tokenizer:
    return _as_encoder(Tokenizer.from_str(json_text))


def _as_encoder(tok: Tokenizer) -> Tokenizer:
    tok.encode_special_tokens = True  # text that spells a special token is not a separator
    return tok


def document_encoder(json_text: str, engine: str):
    """texts -> token ids per text, with `tokenizers` ("hf") or its tiktoken conversion ("tiktoken")."""
    if engine == "tiktoken":
        from shardgen.fastbpe import convert
        return convert(json_text).encode_batch
    tok = make_encoder(json_text)
    return lambda texts: [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def document_splitter(json_text: str, limit: int):
    """text -> where its parts end: [len(text)], or parts of about `limit` characters where this tokenizer
    gives the same tokens for the parts as for the whole (byte-level BPE with GPT-2's, Llama 3's or
    Qwen's regex; see fastbpe.cut)."""
    from shardgen import fastbpe
    if fastbpe.cuttable(json_text) is not None:
        return lambda text: [len(text)]
    return lambda text: [len(text)] if len(text) <= limit else fastbpe.cut(text, limit)


def choose_engine(json_text: str, requested: str, sample: list[str], hf: Tokenizer | None = None) -> tuple[str, str]:
    """("tiktoken" or "hf", one line saying why): tiktoken only where it gave every token of the
    hard strings and of `sample` (the input's first documents) exactly as tokenizers (`hf`) does."""
    if requested == "hf":
        return "hf", "tokenizer engine: tokenizers (--tokenizer-engine hf)"
    from shardgen import fastbpe
    doc = json.loads(json_text)
    try:
        fast = fastbpe.convert(doc)
        token = fastbpe.unreachable_token(doc)
    except fastbpe.Unsupported as e:
        return "hf", f"tokenizer engine: tokenizers (no exact tiktoken conversion: {e})"
    if token is not None:
        return "hf", f"tokenizer engine: tokenizers (its BPE does not merge token {token!r} back into itself)"
    if fastbpe.drops_text(fast):
        return "hf", "tokenizer engine: tokenizers (tiktoken would drop the characters its regex does not match)"
    hf = hf or make_encoder(json_text)
    if fast.fallback is not None:  # the loaded one, not a second load
        fast.fallback = lambda text: hf.encode(text, add_special_tokens=False).ids
    diff = fastbpe.first_difference(hf, fast, list(fastbpe.HARD_STRINGS) + sample)
    if diff is not None:
        return "hf", f"tokenizer engine: tokenizers (tiktoken tokenizes {diff} differently)"
    return "tiktoken", (f"tokenizer engine: tiktoken (the same tokens as tokenizers on {len(fastbpe.HARD_STRINGS)} "
                        f"hard strings and the first {len(sample)} documents; --tokenizer-engine hf to use tokenizers)")


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hub_files(name: str) -> tuple[str, str | None]:
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(name, TOKENIZER_NAME)
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise TokenizerError(f"{name}: not a local tokenizer.json or directory, and the Hugging Face hub "
                             f"could not provide it ({type(e).__name__}: {str(e)[:200]}); download the "
                             f"tokenizer.json elsewhere and pass its path") from None
    try:
        config = hf_hub_download(name, CONFIG_NAME)
    except Exception:  # noqa: BLE001 - the config is optional
        config = None
    return path, config


def _files(spec: str) -> tuple[str, str | None]:
    if os.path.isdir(spec):
        path = os.path.join(spec, TOKENIZER_NAME)
        if not os.path.isfile(path):
            raise TokenizerError(f"{spec}: directory has no {TOKENIZER_NAME}; train one with "
                                 f"`python -m shardgen train-tokenizer INPUT --output {spec}`")
    elif os.path.isfile(spec):
        path = spec
    elif spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _hub_files(spec)
    else:
        raise TokenizerError(f"{spec}: no such tokenizer.json or directory")
    config = os.path.join(os.path.dirname(path), CONFIG_NAME)
    return path, config if os.path.isfile(config) else None


def _pick(tok: Tokenizer, explicit: str | None, configured: str | None, candidates, what: str,
          flag: str, source: str) -> tuple[str, int]:
    if explicit is not None:
        tid = tok.token_to_id(explicit)
        if tid is None:
            raise TokenizerError(f"{source}: {flag} {explicit!r} is not in the vocabulary")
        return explicit, tid
    for name in ([configured] if configured else []) + list(candidates):
        tid = tok.token_to_id(name)
        if tid is not None:
            return name, tid
    raise TokenizerError(f"{source}: no {what} token found (looked for {', '.join(candidates)}); "
                         f"name one with {flag}")


def load_tokenizer(spec: str, eos_token: str | None = None, bos_token: str | None = None,
                   add_bos: bool = False) -> TokenizerInfo:
    path, config_path = _files(spec)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tok = Tokenizer.from_str(data.decode())
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for bad files
        raise TokenizerError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
    config = {}
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except ValueError as e:
                raise TokenizerError(f"{config_path}: not valid JSON ({e}); fix or remove it (it names the "
                                     f"EOS and BOS tokens; --eos-token and --bos-token can instead)") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: not a JSON object; fix or remove it")
    eos, eos_id = _pick(tok, eos_token, _token_name(config.get("eos_token")), EOS_CANDIDATES, "EOS",
                        "--eos-token", path)
    bos, bos_id = (None, None)
    if add_bos:
        bos, bos_id = _pick(tok, bos_token, _token_name(config.get("bos_token")), BOS_CANDIDATES, "BOS",
                            "--bos-token", path)
    return TokenizerInfo(source=spec, json_text=data.decode(), sha256=hashlib.sha256(data).hexdigest(),
                         vocab_size=tok.get_vocab_size(with_added_tokens=True), eos_token=eos, eos_id=eos_id,
                         bos_token=bos, bos_id=bos_id, encoder=_as_encoder(tok))


def train_bpe(texts, vocab_size: int, output_dir: str, min_frequency: int = 2) -> str:
    """Train a byte-level BPE (GPT-2 style, lossless for any Unicode) with TRAINED_EOS as id 0 and
    write output_dir/tokenizer.json plus a tokenizer_config.json that PreTrainedTokenizerFast reads."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[TRAINED_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, TOKENIZER_NAME)
    tok.save(path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": TRAINED_EOS, "bos_token": None,
              "unk_token": None, "pad_token": None, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
    with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return path


BYTE_ALPHABET = 256


def train_tokenizer(inputs: list[str], output_dir: str, vocab_size: int, min_frequency: int = 2,
                    text_key: str = "text", max_bytes: int | None = None, skip_bad: bool = False,
                    overwrite: bool = False) -> str:
    """Train on the documents of `inputs` (any input format), in input order, up to `max_bytes` of text."""
    from itertools import chain

    from shardgen.inputs import list_inputs, pieces_of
    from shardgen.readers import DocumentReader

    smallest = BYTE_ALPHABET + 1  # every byte, and TRAINED_EOS
    if vocab_size < smallest:
        raise TokenizerError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {smallest} tokens (the "
                             f"{BYTE_ALPHABET} bytes and {TRAINED_EOS}) plus its merges; 32000 is usual")
    existing = os.path.join(output_dir, TOKENIZER_NAME)
    if os.path.exists(existing) and not overwrite:
        raise TokenizerError(f"{existing} exists: pass --overwrite to replace it, or choose another --output")
    files, _ = list_inputs(inputs)

    def texts():
        total = 0
        for f in files:
            for piece in pieces_of(f, max(f.size, 1)):
                for text in DocumentReader(piece, text_key, skip_bad):
                    yield text
                    total += len(text.encode())  # bytes, as --max-bytes says (characters undercount non-ASCII)
                    if max_bytes is not None and total >= max_bytes:
                        return

    docs = texts()
    first = next(docs, None)  # empty documents are skipped by the reader: None means no text at all
    if first is None:
        raise TokenizerError(f"{' '.join(inputs)}: no text to train on ({len(files)} input files, every document "
                             f"empty); check the inputs and --text-key {text_key!r}")
    return train_bpe(chain([first], docs), vocab_size, output_dir, min_frequency)
