"""What the trainer checks before it builds a model: data paths, run.out_dir, model.init_from against the shards.
Each bad input is one error line from `python -m trainer` (run in-process here: the check comes before any
training, so no subprocess is needed)."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"triton-cache-{os.getuid()}"))

import pytest  # noqa: E402

from tests.train_support import make_shards, tiny_model_json, write_toml  # noqa: E402
from trainer.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(str(tmp_path_factory.mktemp("checks") / "shards"), sequences=16, seq_len=32)


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0][len("error: "):]


def test_a_data_path_that_does_not_exist_is_named_before_the_model_is_built(tmp_path, shards, capsys):
    out, missing = tmp_path / "out", str(tmp_path / "nowhere")
    cfg = write_toml(str(tmp_path / "run.toml"), {
        "model": {"config": tiny_model_json(str(tmp_path / "gla.json"))},
        "data": {"shards": shards, "global_batch": 4, "val_shards": shards},
        "train": {"max_steps": 1, "eval_every": 1}, "run": {"out_dir": str(out), "progress": False}})
    make = f"make the shards with `python -m shardgen INPUT --output {missing} --tokenizer ...`, or fix the path"
    for key in ("data.val_shards", "data.shards"):
        assert one_error_line(capsys, [cfg, f"{key}={missing}"]) == f"{key}={missing} does not exist: {make}"
        assert not (out / "model.json").exists()  # the run files are written as the model is made: not yet
        assert not out.exists()  # nor an empty run directory left behind by the failed launch

    mix = write_toml(str(tmp_path / "mix.toml"), {  # a mixture: every source's shards and val_shards
        "model": {"config": str(tmp_path / "gla.json")}, "data": {"global_batch": 4},
        "train": {"max_steps": 1, "eval_every": 1}, "run": {"out_dir": str(out), "progress": False}})
    with open(mix, "a") as f:
        f.write(f'[[data.sources]]\nname = "a"\nshards = "{shards}"\nval_shards = "{shards}"\n'
                f'[[data.sources]]\nname = "b"\nshards = "{shards}"\nval_shards = "{missing}"\n')
    assert one_error_line(capsys, [mix]).startswith(f"data.sources[1].val_shards (b)={missing} does not exist")
    assert not out.exists()
    out.mkdir()  # a directory that was there before the launch stays, empty or not
    assert one_error_line(capsys, [mix]).startswith(f"data.sources[1].val_shards (b)={missing} does not exist")
    assert out.is_dir()


def test_run_out_dir_that_is_a_file_is_one_line(tmp_path, shards, capsys):
    (tmp_path / "file").write_text("not a directory")
    cfg = write_toml(str(tmp_path / "run.toml"), {
        "model": {"config": tiny_model_json(str(tmp_path / "gla.json"))},
        "data": {"shards": shards, "global_batch": 4},
        "train": {"max_steps": 1}, "run": {"out_dir": str(tmp_path / "file"), "progress": False}})
    msg = one_error_line(capsys, [cfg])
    assert msg.startswith(f"run.out_dir={tmp_path / 'file'} is a file, not a directory")
    assert (tmp_path / "file").read_text() == "not a directory"


def test_init_from_is_checked_against_the_shards_before_its_weights_load(tmp_path, shards, capsys):
    import json
    import shutil

    from tests.train_support import tokenizer_json
    hf = tmp_path / "hf"  # config.json and tokenizer.json only: the checks come before the weights are read
    os.makedirs(hf)
    cfg = write_toml(str(tmp_path / "run.toml"), {
        "model": {"init_from": str(hf)}, "data": {"shards": shards, "global_batch": 4},
        "train": {"max_steps": 1}, "run": {"out_dir": str(tmp_path / "out"), "progress": False}})
    with open(os.path.join(shards, "manifest.json")) as f:
        vocab = json.load(f)["tokenizer"]["vocab_size"]

    (hf / "config.json").write_text(json.dumps({"model_type": "gla", "vocab_size": vocab - 1}))
    assert one_error_line(capsys, [cfg]).startswith(
        f"model.init_from={hf}: vocab_size {vocab - 1} is smaller than the {vocab} token ids of the shards' "
        f"tokenizer ({shards}): start from a model trained with the shards' tokenizer")

    (hf / "config.json").write_text(json.dumps({"model_type": "gla", "vocab_size": vocab}))
    tokenizer_json(str(hf / "tokenizer.json"), vocab, text=["a different corpus, another vocabulary"] * 50)
    msg = one_error_line(capsys, [cfg])
    assert msg.startswith(f"model.init_from={hf}: its tokenizer.json is not the shards' tokenizer ({shards}): ")
    assert "ids name other tokens" in msg

    # the shards' own tokenizer, as an export re-serializes it: the same vocabulary passes
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    os.remove(hf / "tokenizer.json")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(os.path.join(shards, "tokenizer.json")),
                            eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(str(hf))
    with open(os.path.join(shards, "tokenizer.json"), "rb") as f:
        data_tokenizer = f.read()
    assert open(hf / "tokenizer.json", "rb").read() != data_tokenizer
    from models.build import check_pretrained_fits
    check_pretrained_fits(str(hf), vocab, data_tokenizer, shards)
