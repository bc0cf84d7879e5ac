"""trainer.evaluate: a trained model scored on held-out shards, the same number as the run's own val_loss; the run
directory's files are left as they were by a relaunch that is refused."""
import hashlib
import json
import os
import subprocess

import pytest

from tests.train_support import PY, ROOT, env, make_shards, run_trainer, tiny_model_json, write_toml
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow  # trainer runs in subprocesses (make test-fast skips them)
RUN_FILES = ("config.toml", "data.json", "model.json", "tokenizer.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    ds = {"shards": make_shards(str(root / "shards"), sequences=64, seq_len=32),
          "val": make_shards(str(root / "val"), sequences=16, seq_len=32, seed=1),
          # other shards with another tokenizer (a smaller BPE: other merges, other ids)
          "other": make_shards(str(root / "other"), sequences=16, seq_len=32, vocab=300)}
    cfg = write_toml(str(root / "run.toml"), {
        "model": {"config": tiny_model_json(str(root / "gla.json"))},
        "data": {"shards": ds["shards"], "global_batch": 4, "val_shards": ds["val"], "val_sequences": 12},
        "train": {"max_steps": 6, "eval_every": 6}, "optim": {"lr": 1e-2, "warmup": 1},
        "checkpoint": {"every": 3, "keep": 2},
        "run": {"out_dir": str(root / "out"), "progress": False}})
    run_trainer(str(root), cfg)
    return {**ds, "root": str(root), "out": str(root / "out"), "cfg": cfg}


def evaluate(tmp, *args):
    return subprocess.run([PY, "-m", "trainer.evaluate", *args], cwd=ROOT, env=env(str(tmp)), capture_output=True,
                          text=True, timeout=600)


def test_a_run_scores_its_own_val_loss_and_its_export_the_same(tmp_path, trained):
    val_loss = [r["val_loss"] for r in read_metrics(trained["out"]) if "val_loss" in r][-1]
    p = evaluate(tmp_path, trained["out"], "--shards", trained["val"], "--sequences", "12", "--micro-batch", "4",
                 "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["loss"] == pytest.approx(val_loss, rel=1e-5)  # the step-6 weights, the same 12 rows
    assert r["sequences"] == 12 and r["tokens"] == 12 * 31 and r["device"] == "cpu"
    hf = str(tmp_path / "hf")
    e = subprocess.run([PY, "-m", "trainer.export", trained["out"], hf], cwd=ROOT, env=env(str(tmp_path)),
                       capture_output=True, text=True, timeout=600)
    assert e.returncode == 0, e.stderr
    # a new user's trial: the export printed FLA's "Triton is not supported on current platform" warning and a
    # "Writing model shards" bar for one small file
    assert "not supported on current platform" not in e.stderr and "Writing model shards" not in e.stderr, e.stderr
    p = evaluate(tmp_path, hf, "--shards", trained["val"], "--sequences", "12", "--micro-batch", "4")
    assert p.returncode == 0, p.stderr
    assert f"loss {val_loss:.4f} nats/token" in p.stdout and "12 sequences x 31 predicted tokens" in p.stdout


def test_shards_of_another_tokenizer_are_refused_naming_both(tmp_path, trained):
    p = evaluate(tmp_path, trained["out"], "--shards", trained["other"])
    assert p.returncode == 1
    assert f"was trained with another tokenizer than {trained['other']} was made with" in p.stderr
    assert "ids name other tokens" in p.stderr and "Traceback" not in p.stderr


def test_more_sequences_than_the_shards_hold_scores_them_all(tmp_path, trained):
    p = evaluate(tmp_path, trained["out"], "--shards", trained["val"], "--sequences", "1000", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["sequences"] == 16 and "holds 16, scoring them all" in p.stderr


def _digests(out: str) -> dict:
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in RUN_FILES}


@pytest.mark.parametrize("steps", [6, 9])  # the run took 6: relaunched as finished, and to go on
@pytest.mark.parametrize("change", [("data.shards", "other"), ("data.global_batch", 8)])
def test_a_refused_relaunch_leaves_the_run_files_as_they_were(tmp_path, trained, change, steps):
    # a new user's trial: relaunching the demo's run dir on other shards was refused, but it had already written
    # the new data's tokenizer.json, data.json and config.toml there, so the export then shipped the wrong tokenizer
    before = _digests(trained["out"])
    key, value = change
    value = trained[value] if key == "data.shards" else value
    p = run_trainer(str(tmp_path), trained["cfg"], f"{key}={value}", f"train.max_steps={steps}", check=False)
    assert p.returncode == 1, p.stderr
    assert _digests(trained["out"]) == before
