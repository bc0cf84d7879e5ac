"""Training on a mixture end to end on CPU: a tiny GLA on two sources with a stage, killed and resumed."""
import json
import os

import pytest

from tests.train_support import PY, final_weights, kill_after_steps, losses, make_shards, run_trainer, tiny_model_json
from trainer.metrics import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-data")
    return {"a": make_shards(str(root / "a"), sequences=64, seq_len=32, seed=0),
            "b": make_shards(str(root / "b"), sequences=24, seq_len=32, seed=2),
            "a_val": make_shards(str(root / "a_val"), sequences=8, seq_len=32, seed=1),
            "b_val": make_shards(str(root / "b_val"), sequences=8, seq_len=32, seed=3),
            "model": tiny_model_json(str(root / "gla.json"))}


def mix_config(tmp_path, ds, name, out, max_steps=8, stage_weights="{ a = 1, b = 3 }"):
    text = f"""[model]
config = "{ds['model']}"
[data]
global_batch = 4
seed = 3
val_sequences = 4
max_repeats = 0.5
[[data.sources]]
name = "a"
shards = "{ds['a']}"
weight = 3
val_shards = "{ds['a_val']}"
[[data.sources]]
name = "b"
shards = "{ds['b']}"
weight = 1
val_shards = "{ds['b_val']}"
[[data.stages]]
start_step = 4
weights = {stage_weights}
[train]
max_steps = {max_steps}
micro_batch = 2
eval_every = 4
[optim]
lr = 1e-2
min_lr = 1e-3
warmup = 2
[checkpoint]
every = 2
keep = 2
[run]
out_dir = "{tmp_path / out}"
progress = false
"""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_mixture_run_logs_sources_and_resumes_bitwise_after_sigkill(tmp_path, data):
    # the PyTorch CPU ops (fast steps): 40 steps leave the kill below seconds of margin
    full = mix_config(tmp_path, data, "full.toml", "full", max_steps=40)
    p = run_trainer(str(tmp_path), full)
    assert "mixture of 2 sources, global batch 4" in p.stderr
    assert "source 'b' will be read" in p.stderr and "more than data.max_repeats=0.5" in p.stderr
    records = read_metrics(str(tmp_path / "full"))
    # 3:1 for steps 0-3 (3 + 1 rows a step), then 1:3: exact per step, so the tokens are known
    assert [(r["tokens/a"], r["tokens/b"]) for r in records[:8]] == [
        (32 * a, 32 * b) for a, b in [(3, 1), (6, 2), (9, 3), (12, 4), (13, 7), (14, 10), (15, 13), (16, 16)]]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == list(range(3, 40, 4))
    for r in vals:  # equal validation sets: the token-weighted mean is the plain mean
        assert r["val_loss"] == pytest.approx((r["val/a"] + r["val/b"]) / 2)
    summary = json.load(open(tmp_path / "full" / "summary.json"))
    assert summary["mix"] == {"a": (12 + 36) / 160, "b": (4 + 3 * 36) / 160}  # rows of a and b in 40 x 4
    assert json.load(open(tmp_path / "full" / "data.json"))["shards"] == {"a": data["a"], "b": data["b"]}

    killed = mix_config(tmp_path, data, "killed.toml", "killed", max_steps=40)
    kill_after_steps([PY, "-m", "trainer", killed], str(tmp_path), str(tmp_path / "killed"), 5)
    assert len(losses(str(tmp_path / "killed"))) < 40
    p = run_trainer(str(tmp_path), killed)
    assert "resumed from" in p.stderr
    assert losses(str(tmp_path / "killed")) == losses(str(tmp_path / "full"))  # exact float equality
    assert read_metrics(str(tmp_path / "killed"))[-1]["val/b"] == records[-1]["val/b"]
    a, _ = final_weights(str(tmp_path / "full"))
    b, _ = final_weights(str(tmp_path / "killed"))
    for k in a:
        assert a[k].equal(b[k]), k


@pytest.mark.slow
def test_resume_refuses_a_changed_stage_and_accepts_a_later_one(tmp_path, data):
    cfg = mix_config(tmp_path, data, "run.toml", "out", max_steps=6)
    run_trainer(str(tmp_path), cfg)
    changed = mix_config(tmp_path, data, "changed.toml", "out", max_steps=8, stage_weights="{ a = 1, b = 1 }")
    p = run_trainer(str(tmp_path), changed, check=False)
    assert p.returncode != 0
    assert "the stage at step 4 changed (b 3 -> 1) after steps were taken with them" in p.stderr
    later = (tmp_path / "run.toml").read_text().replace("max_steps = 6", "max_steps = 8") + (
        "[[data.stages]]\nstart_step = 6\nweights = { a = 0, b = 1 }\n")
    (tmp_path / "later.toml").write_text(later)
    run_trainer(str(tmp_path), str(tmp_path / "later.toml"))
    records = read_metrics(str(tmp_path / "out"))
    assert [r["step"] for r in records] == list(range(8))
    assert records[-1]["tokens/a"] == records[5]["tokens/a"]  # paused from step 6
