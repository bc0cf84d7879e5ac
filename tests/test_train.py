"""The training loop end to end on CPU (a tiny GLA, subprocesses like a user runs it).

Most tests here check the trainer's machinery and run with the default CPU kernels (model.cpu_kernels=torch,
models/cpu_torch.py). The ones about FLA's real kernels in the loop set INTERPRETER: the run that must learn,
the SIGKILL-and-resume (steps slow enough to be killed mid-run) and varlen (FLA's varlen kernels fed the
trainer's cu_seqlens)."""
import json
import os
import subprocess

import pytest

from tests.train_support import (PY, ROOT, env, final_weights, kill_after_steps, losses, make_shards, run_trainer,
                                 signal_after_steps, tiny_model_json, write_toml)
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow  # trainer runs in subprocesses (make test-fast skips them)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    return {"shards": make_shards(str(root / "shards"), sequences=96, seq_len=32),
            "val": make_shards(str(root / "val"), sequences=16, seq_len=32, seed=1),
            "model": tiny_model_json(str(root / "gla.json")), "root": str(root)}


INTERPRETER = {"cpu_kernels": "triton"}  # [model] keys: FLA's Triton kernels under the Triton interpreter


def config(tmp_path, ds, name="run.toml", **sections):
    base = {"model": {"config": ds["model"]},
            "data": {"shards": ds["shards"], "global_batch": 4, "seed": 3},
            "train": {"max_steps": 8, "micro_batch": 2},
            "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup": 2},
            "checkpoint": {"every": 2, "keep": 2},
            "run": {"out_dir": str(tmp_path / "out"), "progress": False}}
    for sec, table in sections.items():
        base.setdefault(sec, {}).update(table)
    return write_toml(str(tmp_path / name), base)


def test_loss_goes_down_and_run_dir_is_complete(tmp_path, data):
    # FLA's own kernels (interpreted) learn in the loop; tests/test_cpu_torch.py checks the PyTorch ops against them
    cfg = config(tmp_path, data, model=INTERPRETER, train={"max_steps": 14, "eval_every": 7},
                 data={"val_shards": data["val"], "val_sequences": 8}, checkpoint={"every": 0},
                 run={"peak_tflops": 0.001})  # a made-up peak, so that MFU is computed on a CPU
    run_trainer(str(tmp_path), cfg)
    out = str(tmp_path / "out")
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(14))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.3, (first, last)
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "data_wait_share", "memory_gib",
                "skipped_steps"):
        assert key in records[0]
    assert records[-1]["tokens"] == 14 * 4 * 32
    summary_flops = json.load(open(os.path.join(str(tmp_path / "out"), "summary.json")))["flops_per_token"]
    for r in records:
        assert r["mfu"] == pytest.approx(summary_flops * r["tokens_per_s"] / 1e9, rel=1e-9)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 14 and summary["best_val_loss"] == min(vals)
    assert summary["checkpoint"].endswith("step-000014")  # saved at the end
    for f in ("config.toml", "model.json", "tokenizer.json", "data.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert os.listdir(os.path.join(out, "tb"))


def test_sigkill_resume_is_bitwise_exact(tmp_path, data):
    """A run killed with SIGKILL mid-way and rerun gives the same per-step losses and final weights, bit for bit.
    Under the interpreter: its steps are slow enough to kill the run between step 5 and step 8 every time (the
    PyTorch ops' bitwise resume is checked by test_corrupt_checkpoint_is_named_and_previous_is_used)."""
    full = config(tmp_path, data, "full.toml", model=INTERPRETER, run={"out_dir": str(tmp_path / "full")})
    run_trainer(str(tmp_path), full)

    killed = config(tmp_path, data, "killed.toml", model=INTERPRETER, run={"out_dir": str(tmp_path / "killed")})
    # steps 0-4 done, checkpoint at 4 written
    kill_after_steps([PY, "-m", "trainer", killed], str(tmp_path), str(tmp_path / "killed"), 5)
    assert len(losses(str(tmp_path / "killed"))) < 8

    p = run_trainer(str(tmp_path), killed)
    assert "resumed from" in p.stderr
    assert losses(str(tmp_path / "killed")) == losses(str(tmp_path / "full"))  # exact float equality
    a, pa = final_weights(str(tmp_path / "full"))
    b, pb = final_weights(str(tmp_path / "killed"))
    assert os.path.basename(pa) == os.path.basename(pb) == "step-000008"
    for k in a:
        assert a[k].equal(b[k]), k


def test_corrupt_checkpoint_is_named_and_previous_is_used(tmp_path, data):
    cfg = config(tmp_path, data, train={"max_steps": 4})
    run_trainer(str(tmp_path), cfg)
    out = str(tmp_path / "out")
    before = losses(out)
    shard = os.path.join(out, "ckpt", "step-000004", "__0_0.distcp")
    with open(shard, "r+b") as f:  # flip bytes in the middle of the tensor data
        f.seek(os.path.getsize(shard) // 2)
        f.write(b"\xff" * 16)
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=6")
    assert "step-000004 is damaged" in p.stderr and "CRC32" in p.stderr
    assert "resumed from" in p.stderr and "step-000002 at step 2" in p.stderr
    after = losses(out)
    assert after[:4] == before  # steps 2 and 3 were redone from the good checkpoint, identically (PyTorch ops)
    assert [s for s, _ in after] == list(range(6))


def test_incomplete_checkpoints_are_ignored_and_all_bad_is_an_error(tmp_path, data):
    cfg = config(tmp_path, data, train={"max_steps": 2})
    run_trainer(str(tmp_path), cfg)
    ckpt = tmp_path / "out" / "ckpt"
    os.makedirs(ckpt / "step-000004.tmp")  # a save that was killed: never a candidate
    os.remove(ckpt / "step-000002" / "train_state.json")
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=3", check=False)
    assert p.returncode == 1
    assert "no usable checkpoint" in p.stderr and "step-000002" in p.stderr and "train_state.json" in p.stderr


def test_bad_config_key_names_key_and_file(tmp_path, data):
    cfg = config(tmp_path, data, train={"max_step": 3})
    p = subprocess.run([PY, "-m", "trainer", cfg], cwd=ROOT, env=env(str(tmp_path)), capture_output=True, text=True)
    assert p.returncode == 2 and "train.max_step" in p.stderr and cfg in p.stderr
    p = subprocess.run([PY, "-m", "trainer", config(tmp_path, data), "optim.lr=fast"], cwd=ROOT,
                       env=env(str(tmp_path)), capture_output=True, text=True)
    assert p.returncode == 2 and "optim.lr" in p.stderr and "command line" in p.stderr


def test_diverging_run_stops_and_keeps_last_checkpoint(tmp_path, data):
    cfg = config(tmp_path, data, train={"max_steps": 4})
    run_trainer(str(tmp_path), cfg)
    os.makedirs(tmp_path / "out" / "ckpt" / "step-000010")  # damaged (no train_state.json): not the one to name
    # An absurd learning rate from step 4 on: the weights overflow, losses become NaN/inf.
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=20", "optim.lr=1e38", "optim.min_lr=1e38",
                    "optim.warmup=0", "optim.clip=0", "train.max_bad_steps=3", "checkpoint.every=100",
                    check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "3 steps in a row with a NaN/inf" in p.stderr
    assert "likely causes: " in p.stderr and "optim.lr=1e+38 is high for AdamW" in p.stderr
    assert "clipping is off (optim.clip=0)" in p.stderr
    assert f"The last checkpoint ({tmp_path / 'out' / 'ckpt' / 'step-000004'}) is intact" in p.stderr
    records = read_metrics(str(tmp_path / "out"))
    assert records[-1]["skipped_steps"] == 3
    assert os.path.isdir(tmp_path / "out" / "ckpt" / "step-000004")
    assert sorted(os.listdir(tmp_path / "out" / "ckpt")) == ["step-000002", "step-000004", "step-000010"]


def test_second_run_in_a_busy_out_dir_is_refused(tmp_path, data):
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # as a running trainer holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on nodeA\n")
        held.flush()
        p = run_trainer(str(tmp_path), config(tmp_path, data, train={"max_steps": 1}), check=False)
    assert p.returncode == 1
    assert f"run.out_dir={out}: another run is writing to it (pid 4242 on nodeA)" in p.stderr
    assert not os.path.exists(out / "metrics.jsonl") and not os.path.exists(out / "ckpt")
    # Released (as when the holder dies, even by SIGKILL): the same directory trains.
    run_trainer(str(tmp_path), config(tmp_path, data, train={"max_steps": 1}))
    assert len(read_metrics(str(out))) == 1


def test_compile_on_cpu_is_switched_off_with_one_line(tmp_path, data):
    p = run_trainer(str(tmp_path), config(tmp_path, data, train={"max_steps": 1, "compile": True}))
    assert p.stderr.count("train.compile switched off on cpu") == 1
    assert len(read_metrics(str(tmp_path / "out"))) == 1


def test_cuda_graphs_on_cpu_are_switched_off_with_one_line_and_refused_with_fsdp(tmp_path, data):
    """train.cuda_graphs is a GPU option: a CPU run of a GPU config trains eagerly and says so once; what no
    device covers (here FSDP2) stops the run before any step, naming the fix."""
    p = run_trainer(str(tmp_path), config(tmp_path, data, train={"max_steps": 1, "cuda_graphs": True}))
    assert p.stderr.count("train.cuda_graphs switched off on cpu") == 1
    assert len(read_metrics(str(tmp_path / "out"))) == 1
    p = run_trainer(str(tmp_path), config(tmp_path, data, train={"max_steps": 1, "cuda_graphs": True},
                                          run={"out_dir": str(tmp_path / "fsdp")}),
                    "parallel.mode=fsdp", check=False)
    assert p.returncode == 1
    assert "train.cuda_graphs does not cover parallel.mode=fsdp" in p.stderr and "train.cuda_graphs=false" in p.stderr
    assert not os.path.exists(tmp_path / "fsdp" / "metrics.jsonl")


def test_varlen_training_runs(tmp_path, data):
    cfg = config(tmp_path, data, model=INTERPRETER,
                 data={"varlen": True, "val_shards": data["val"], "val_sequences": 4},
                 train={"max_steps": 3, "eval_every": 3}, checkpoint={"every": 0})
    run_trainer(str(tmp_path), cfg)
    records = read_metrics(str(tmp_path / "out"))
    assert len(records) == 3 and all(r["loss"] == r["loss"] for r in records)
    assert 0 < records[-1]["val_loss"] < 100  # validated with document masking too


def test_resume_with_another_global_batch_is_refused(tmp_path, data):
    cfg = config(tmp_path, data, train={"max_steps": 2})
    run_trainer(str(tmp_path), cfg)
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=4", "data.global_batch=8", check=False)
    assert p.returncode == 1 and "global batch changed (4 -> 8" in p.stderr
    assert "for a new run give run.out_dir another directory" in p.stderr  # how to start afresh, not just "start"


def test_a_resume_logs_the_settings_changed_since_the_last_launch(tmp_path, data):
    """A resume may change the learning rate, max_steps and such (a changed seed or global batch is refused), but
    not silently: one line names each change against the last launch's config.toml, which a refused launch
    leaves as it was (it was rewritten before the resume was checked)."""
    cfg = config(tmp_path, data, train={"max_steps": 2}, checkpoint={"every": 0})
    p = run_trainer(str(tmp_path), cfg)
    assert "settings changed" not in p.stderr
    path = tmp_path / "out" / "config.toml"
    first = path.read_text()
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=4", "data.global_batch=8", check=False)
    assert p.returncode == 1 and "global batch changed (4 -> 8" in p.stderr
    assert path.read_text() == first
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=4", "optim.lr=1e-3")
    assert "(saved by 1 rank, now 1)" in p.stderr
    changed = [line for line in p.stderr.splitlines() if "settings changed" in line]
    assert len(changed) == 1 and changed[0].endswith(
        "trainer: resume: settings changed since the last launch: train.max_steps 2 -> 4; optim.lr 0.01 -> 0.001")
    assert "max_steps = 4" in path.read_text() and "lr = 0.001" in path.read_text()
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=4", "optim.lr=1e-3")  # the same again: nothing changed
    assert "nothing to train" in p.stderr and "settings changed" not in p.stderr
    assert [s for s, _ in losses(str(tmp_path / "out"))] == [0, 1, 2, 3]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_same_command_resumes(tmp_path, data, sig):
    import signal
    cfg = config(tmp_path, data, train={"max_steps": 10 ** 6}, checkpoint={"every": 0, "at_end": False})
    out = str(tmp_path / "out")
    p = signal_after_steps([PY, "-m", "trainer", cfg], str(tmp_path), out, 3, signal.Signals[sig])
    assert p.returncode == 128 + signal.Signals[sig].value, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    n = len(read_metrics(out))
    assert n >= 3 and f"{sig}: stopping after this step" in p.stderr
    assert f"stopped by {sig} after step {n} of {10 ** 6}: checkpoint {out}/ckpt/step-{n:06d}" in p.stderr
    assert f"stopped: steps={n}, " in p.stderr and "done: " not in p.stderr  # the summary line of a stopped run
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["stopped_by"] == sig and summary["steps"] == n
    p = run_trainer(str(tmp_path), cfg, f"train.max_steps={n + 2}")
    assert f"step-{n:06d} at step {n}" in p.stderr and "stopped_by" not in json.load(open(os.path.join(out, "summary.json")))
    assert [s for s, _ in losses(out)] == list(range(n + 2))


def test_shards_without_a_tokenizer_train_with_a_warning(tmp_path, data):
    import shutil
    shards = str(tmp_path / "shards")
    shutil.copytree(data["shards"], shards)
    os.remove(os.path.join(shards, "tokenizer.json"))
    p = run_trainer(str(tmp_path), config(tmp_path, data, data={"shards": shards}, train={"max_steps": 1},
                                          checkpoint={"every": 0}))
    assert f"{shards}/tokenizer.json does not exist" in p.stderr and "export of this run will hold the model only" in p.stderr


def test_relaunching_a_finished_run_keeps_its_summary(tmp_path, data):
    # `make train` twice: the second launch finds the checkpoint at train.max_steps. It used to write a summary
    # of an empty run over the finished one's (final_loss null).
    cfg = config(tmp_path, data, train={"max_steps": 4, "eval_every": 2},
                 data={"val_shards": data["val"], "val_sequences": 4})
    run_trainer(str(tmp_path), cfg)
    path = os.path.join(str(tmp_path / "out"), "summary.json")
    first = json.load(open(path))
    assert first["steps"] == 4 and first["final_loss"] is not None and first["final_val_loss"] is not None
    p = run_trainer(str(tmp_path), cfg)
    assert "nothing to train" in p.stderr and "train.max_steps" in p.stderr
    assert json.load(open(path)) == first
    assert [s for s, _ in losses(str(tmp_path / "out"))] == [0, 1, 2, 3]
    # a finished run whose summary is missing (killed after its last checkpoint): written from its metrics
    os.remove(path)
    run_trainer(str(tmp_path), cfg)
    again = json.load(open(path))
    assert again["steps"] == 4 and again["steps_this_run"] == 0
    assert again["final_loss"] == first["final_loss"] and again["final_val_loss"] == first["final_val_loss"]


def test_resume_keeps_the_first_launchs_layout_and_s3_out_dir_is_refused(tmp_path, data):
    # The layout is fixed at the first launch: a resume that does not repeat data.layout takes the
    # checkpoint's (instead of the default = global batch, which the loader would refuse).
    cfg = config(tmp_path, data, train={"max_steps": 2}, data={"layout": 2}, checkpoint={"every": 0})
    run_trainer(str(tmp_path), cfg)
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=3", "data.layout=none")
    assert "resumed from" in p.stderr and [s for s, _ in losses(str(tmp_path / "out"))] == [0, 1, 2]
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=4", "data.layout=4", check=False)
    assert p.returncode == 1 and "layout changed (2 -> 4" in p.stderr
    p = run_trainer(str(tmp_path), cfg, "run.out_dir=s3://bucket/run", check=False)
    assert p.returncode == 1 and "run.out_dir=s3://bucket/run: checkpoints to object storage are not supported" in p.stderr
