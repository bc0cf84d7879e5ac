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

    mix = write_toml(str(tmp_path / "mix.toml"), {  # a mixture: every source's shards and val_shards
        "model": {"config": str(tmp_path / "gla.json")}, "data": {"global_batch": 4},
        "train": {"max_steps": 1, "eval_every": 1}, "run": {"out_dir": str(out), "progress": False}})
    with open(mix, "a") as f:
        f.write(f'[[data.sources]]\nname = "a"\nshards = "{shards}"\nval_shards = "{shards}"\n'
                f'[[data.sources]]\nname = "b"\nshards = "{shards}"\nval_shards = "{missing}"\n')
    assert one_error_line(capsys, [mix]).startswith(f"data.sources[1].val_shards (b)={missing} does not exist")
    assert not (out / "model.json").exists()


def test_run_out_dir_that_is_a_file_is_one_line(tmp_path, shards, capsys):
    (tmp_path / "file").write_text("not a directory")
    cfg = write_toml(str(tmp_path / "run.toml"), {
        "model": {"config": tiny_model_json(str(tmp_path / "gla.json"))},
        "data": {"shards": shards, "global_batch": 4},
        "train": {"max_steps": 1}, "run": {"out_dir": str(tmp_path / "file"), "progress": False}})
    msg = one_error_line(capsys, [cfg])
    assert msg.startswith(f"run.out_dir={tmp_path / 'file'} is a file, not a directory")
    assert (tmp_path / "file").read_text() == "not a directory"
