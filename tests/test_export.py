"""trainer.export: checkpoint -> HF directory that AutoModelForCausalLM/AutoTokenizer load; generation; init_from."""
import os
import shutil
import subprocess
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"triton-cache-{os.getuid()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

from models import cpu_triton  # noqa: E402

cpu_triton.enable()

from tests.train_support import PY, ROOT, env, make_shards, run_trainer, tiny_model_json, write_toml  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow  # trainer runs in subprocesses (make test-fast skips them)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    shards = make_shards(str(root / "shards"), sequences=64, seq_len=32)
    cfg = write_toml(str(root / "run.toml"), {
        "model": {"config": tiny_model_json(str(root / "gla.json"))},
        "data": {"shards": shards, "global_batch": 4},
        "train": {"max_steps": 6}, "optim": {"lr": 1e-2, "warmup": 1},
        "checkpoint": {"every": 3, "keep": 2},
        "run": {"out_dir": str(root / "out"), "progress": False}})
    run_trainer(str(root), cfg)
    return {"root": root, "out": str(root / "out"), "cfg": cfg, "shards": shards}


def export(tmp_path, ckpt, out):
    p = subprocess.run([PY, "-m", "trainer.export", ckpt, out], cwd=ROOT, env=env(str(tmp_path)),
                       capture_output=True, text=True)
    return p


def test_export_round_trip_and_generation(tmp_path, trained):
    import fla  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import load_checkpoint_model
    hf = str(tmp_path / "hf")
    p = export(tmp_path, trained["out"], hf)
    assert p.returncode == 0, p.stderr
    umask = os.umask(0)
    os.umask(umask)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(hf, f)), f
        assert os.stat(os.path.join(hf, f)).st_mode & 0o777 == 0o666 & ~umask, f  # model.safetensors was 0600
    model = AutoModelForCausalLM.from_pretrained(hf)
    ours, _, path = load_checkpoint_model(trained["out"])
    assert path.endswith("step-000006")
    theirs = model.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs[k], v), k  # exported weights are the checkpoint's, bit for bit

    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.eos_token_id == 0 and model.config.eos_token_id == 0
    ids = tok("to be or not", return_tensors="pt").input_ids
    model.config.fuse_cross_entropy = False
    model.eval()
    out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4)
    x = ids  # greedy by hand: the same tokens
    with torch.no_grad():
        for _ in range(4):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)
    assert isinstance(tok.decode(out[0]), str)


def test_generate_on_an_export_stops_at_the_datas_eos(tmp_path, trained):
    """The shards' EOS is 0 (the model JSON says nothing, so FLA's default 2 would stand): the trained model's
    config, config.json, generation_config.json and the tokenizer all say 0, and generate() stops there."""
    import json

    import fla  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with open(os.path.join(trained["out"], "model.json")) as f:
        assert json.load(f)["eos_token_id"] == 0  # the trained model's config
    old = tmp_path / "old-run"  # a run from before: its model.json kept the JSON's ids; the export still fixes them
    shutil.copytree(trained["out"], old)
    with open(old / "model.json") as f:
        d = json.load(f)
    with open(old / "model.json", "w") as f:
        json.dump(dict(d, eos_token_id=2, bos_token_id=1), f)
    hf = str(tmp_path / "hf")
    assert export(tmp_path, str(old), hf).returncode == 0
    for name, keys in (("config.json", ("eos_token_id",)), ("generation_config.json", ("eos_token_id", "pad_token_id"))):
        with open(os.path.join(hf, name)) as f:
            d = json.load(f)
        assert [d[k] for k in keys] == [0] * len(keys) and d.get("bos_token_id") is None, (name, d)
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(hf)
    model.config.fuse_cross_entropy = False
    model.eval()
    # An lm_head of zeros makes every logit 0; greedy argmax takes the first of equal maxima, id 0 = EOS,
    # so the first new token is the data's EOS and generate() must stop right after it.
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = tok("to be or not", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out[0].tolist() == ids[0].tolist() + [0]


def test_generate_cli_from_a_run_and_from_its_export(tmp_path, trained):
    """`python -m trainer.generate` on a CPU: the run dir and its export give the same greedy text, which is the
    argmax continuation of [EOS] + the prompt's tokens (a document's start in packed data without BOS)."""
    from models import cpu_torch
    from trainer.generate import generate, load
    hf = str(tmp_path / "hf")
    assert export(tmp_path, trained["out"], hf).returncode == 0
    outs = []
    for path in (trained["out"], hf):
        p = subprocess.run([PY, "-m", "trainer.generate", path, "to be", "or not", "--max-new-tokens", "6"],
                           cwd=ROOT, env=env(str(tmp_path)), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "Triton is not supported" not in p.stderr  # FLA's warning about the interpreter we chose
        outs.append(p.stdout)
    header = '--- prompt 1/2: "to be"\n'  # several prompts: a header line before each one's output
    assert outs[0] == outs[1] and outs[0].startswith(header + "to be")
    assert '\n--- prompt 2/2: "or not"\nor not' in outs[0]
    try:
        model, tok, eos, bos = load(hf, torch.device("cpu"))
        assert (eos, bos) == (0, None)
        text = generate(model, tok, eos, bos, "to be", max_new_tokens=6)
        x = torch.tensor([[eos] + tok.encode("to be", add_special_tokens=False).ids])
        new = []
        with torch.no_grad():
            for _ in range(6):
                t = int(model(input_ids=x).logits[0, -1].argmax())
                if t == eos:
                    break
                new.append(t)
                x = torch.cat([x, torch.tensor([[t]])], dim=1)
        assert text == tok.decode(new)
        assert outs[0].startswith(header + "to be" + text)
    finally:
        cpu_torch.uninstall()
    p = subprocess.run([PY, "-m", "trainer.generate", str(tmp_path / "nope")], cwd=ROOT, env=env(str(tmp_path)),
                       capture_output=True, text=True)
    assert p.returncode == 1 and "nope does not exist" in p.stderr


def test_export_of_one_checkpoint_dir_and_bad_paths(tmp_path, trained):
    ckpt = os.path.join(trained["out"], "ckpt", "step-000003")
    assert export(tmp_path, ckpt, str(tmp_path / "hf3")).returncode == 0
    stale = tmp_path / "hf3" / "model-00002-of-00002.safetensors"
    stale.write_bytes(b"from an older export")
    p = export(tmp_path, ckpt, str(tmp_path / "hf3"))
    assert p.returncode == 0, p.stderr
    # the new export replaced the old export whole, and left nothing beside it
    assert not stale.exists() and (tmp_path / "hf3" / "config.json").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]
    p = export(tmp_path, str(tmp_path / "nothing"), str(tmp_path / "x"))
    assert p.returncode == 1 and "nothing does not exist" in p.stderr
    bad = tmp_path / "bad-run"  # a run dir whose model.json names no known model: one error line naming it
    os.makedirs(bad / "ckpt" / "step-000001")
    (bad / "model.json").write_text('{"model_type": "nope"}')
    p = export(tmp_path, str(bad), str(tmp_path / "y"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"error: {bad / 'model.json'}: model_type 'nope'" in p.stderr


def test_export_never_removes_a_directory_that_is_not_an_export(tmp_path, trained):
    from trainer.export import main
    runs = tmp_path / "runs"  # a folder of runs, and a run directory: the export would have deleted them
    shutil.copytree(trained["out"], runs / "a")
    before = sorted(str(p.relative_to(runs)) for p in runs.rglob("*"))
    for out in (runs, runs / "a"):
        for flags in ([], ["--overwrite"]):
            assert main([trained["out"], str(out), *flags]) == 1
    assert sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) == before
    err = capsys_lines(main, [trained["out"], str(runs / "a")])
    assert "not a model export (it holds ckpt/, config.toml, data.json, metrics.jsonl and " in err
    assert f"e.g. {runs / 'a' / 'hf'}" in err and "--overwrite or not" in err

    hf = tmp_path / "hf"  # an export with a file of the user's in it: not removed either
    assert main([trained["out"], str(hf)]) == 0
    (hf / "notes.txt").write_text("mine")
    assert main([trained["out"], str(hf), "--overwrite"]) == 1 and (hf / "notes.txt").read_text() == "mine"

    other = tmp_path / "other"  # model files that trainer.export did not write: only with --overwrite
    os.makedirs(other)
    (other / "config.json").write_text("{}")
    assert "pass --overwrite to replace it" in capsys_lines(main, [trained["out"], str(other)])
    assert (other / "config.json").read_text() == "{}"
    assert main([trained["out"], str(other), "--overwrite"]) == 0
    assert (other / "model.safetensors").is_file() and (other / "trainer_export.json").is_file()

    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in capsys_lines(main, [trained["out"], str(tmp_path / "file")])
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def capsys_lines(main, argv) -> str:
    """stderr of an in-process main(argv) that must fail with one error line."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 1
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_init_from_exported_model(tmp_path, trained):
    hf = str(tmp_path / "hf")
    assert export(tmp_path, trained["out"], hf).returncode == 0
    fresh = read_metrics(trained["out"])[0]["loss"]
    p = run_trainer(str(tmp_path), trained["cfg"], f"model.init_from={hf}", f"run.out_dir={tmp_path / 'ft'}",
                    "train.max_steps=2")
    assert "resumed" not in p.stderr
    records = read_metrics(str(tmp_path / "ft"))
    assert [r["step"] for r in records] == [0, 1]  # optimizer and data start fresh
    assert records[0]["loss"] < fresh - 0.1  # but the weights are the trained ones
