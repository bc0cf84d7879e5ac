"""`python -m trainer.export CKPT OUT`: a checkpoint -> an HF model directory (config.json + safetensors + tokenizer).

CKPT is a run's out_dir (meaning its latest complete checkpoint, in OUT_DIR/ckpt or wherever the run's
config.toml puts checkpoint.dir, s3:// included), one checkpoint directory (OUT_DIR/ckpt/step-000100), or, for
a run with a checkpoint.dir, that directory or one checkpoint in it (s3://bucket/ckpt/step-000100: the run
files come from s3://bucket/ckpt/run/, written there at launch). The result loads with

    import fla, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(OUT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(OUT)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from models import build
from shards.errors import UserError
from trainer.checkpoint import CheckpointError, Checkpointer
from trainer.parallel import Dist
from trainer.run_dir import resolve

log = logging.getLogger("trainer.export")

MARKER = "trainer_export.json"  # written into every export: what may be replaced by the next one
# The files an export writes (model.save_pretrained, tokenizer.save_pretrained, the marker): a directory holding
# anything else is not an export and is never removed.
EXPORT_FILE = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|"
                         r"added_tokens|trainer_export)\.json|model(-\d+-of-\d+)?\.safetensors|"
                         r"model\.safetensors\.index\.json|chat_template\.jinja")


class ExportError(UserError, ValueError):
    """OUT cannot take the export. Names OUT and what to do."""


def check_out(out: str, overwrite: bool = False) -> None:
    """OUT may be replaced when it does not exist, is empty, or is an export: ours (it has MARKER), or with
    --overwrite any directory holding only files an export writes. Anything else (a run directory, a folder of
    runs) is refused, --overwrite or not: the swap would delete it."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not os.path.isdir(out):
        raise ExportError(f"{out}: exists and is not a directory; give a new or empty directory as OUT")
    entries = sorted(os.listdir(out), key=lambda e: (e.startswith("."), e))  # hidden names last
    foreign = [e + ("/" if os.path.isdir(os.path.join(out, e)) else "") for e in entries
               if not (EXPORT_FILE.fullmatch(e) and os.path.isfile(os.path.join(out, e))
                       and not os.path.islink(os.path.join(out, e)))]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ExportError(f"{out}: not a model export (it holds {shown}), and an export never removes such a "
                          f"directory, --overwrite or not: give a new or empty directory as OUT "
                          f"(e.g. {os.path.join(out, 'hf')}), or move its contents away first")
    if entries and MARKER not in entries and not overwrite:
        raise ExportError(f"{out}: holds a model that trainer.export did not write (no {MARKER}); pass "
                          f"--overwrite to replace it, or give a new or empty directory as OUT")


def load_checkpoint_model(ckpt: str):
    """The model of a checkpoint, on CPU in fp32, with the run's (unedited) model config."""
    run_dir, path = resolve(ckpt)
    config = build.load_config(os.path.join(run_dir, "model.json"))  # errors name the file
    model = build.build_model(config, "cpu")
    try:
        Checkpointer(os.path.dirname(path), keep=1, d=Dist()).load(path, model)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; export an earlier checkpoint (a directory under {os.path.dirname(path)})") from None
    return model, run_dir, path


def export(ckpt: str, out: str, dtype: str = "float32", overwrite: bool = False) -> str:
    out = out.rstrip("/") or out
    check_out(out, overwrite)  # before the model is loaded: a refused OUT costs nothing
    model, run_dir, path = load_checkpoint_model(ckpt)
    with open(os.path.join(run_dir, "data.json")) as f:
        data = json.load(f)
    # the data's ids in config.json and generation_config.json (a run from before they were in model.json too)
    build.use_data_special_tokens(model.config, data["eos_id"], data["bos_id"], model.generation_config)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    # Built beside OUT and renamed into place: a killed export leaves no half-written OUT, and
    # re-exporting into an old export leaves none of its files behind.
    parent, base = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{base}.tmp-", dir=parent)  # a new name: nothing of the user's is removed
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as os.makedirs would make it (mkdtemp's is private to the user)
    old = os.path.join(parent, os.path.basename(tmp).replace(".tmp-", ".old-", 1))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_tokenizer(run_dir, tmp, data)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"checkpoint": path, "dtype": dtype}, f, indent=1)
        for name in os.listdir(tmp):  # safetensors writes through a private temporary file (0600): as open() would
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        check_out(out, overwrite)  # again: OUT may have changed while the model was written
        if os.path.lexists(out):
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if os.path.lexists(old):
                os.rename(old, out)  # the previous export back in place
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported %s -> %s", path, out)
    return out


def _write_tokenizer(run_dir: str, out: str, data: dict) -> None:
    tok_file = os.path.join(run_dir, "tokenizer.json")
    if not os.path.isfile(tok_file):
        log.warning("%s: no tokenizer.json (the shards had none): exporting the model only", run_dir)
        return
    raw = Tokenizer.from_file(tok_file)
    eos = raw.id_to_token(data["eos_id"])
    bos = raw.id_to_token(data["bos_id"]) if data.get("bos_id") is not None else None
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, bos_token=bos, pad_token=eos,
                                  model_max_length=data.get("seq_len", 2048))
    tok.save_pretrained(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export",
                                description="Write an HF model directory from a trainer checkpoint.")
    p.add_argument("ckpt", help="a run's out_dir (its latest checkpoint), a checkpoint dir (OUT/ckpt/step-N), or a "
                                "checkpoint.dir or one checkpoint in it (s3://bucket/ckpt[/step-N])")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUT holding a model that trainer.export did not write (only model files; a "
                        "directory holding anything else is never removed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # FLA's import warns that Triton "is not supported on current platform" on a machine without a GPU, and
    # transformers draws a bar for writing one file: an export needs neither Triton nor the bar
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        export(args.ckpt, args.out, args.dtype, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
