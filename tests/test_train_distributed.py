"""Two gloo processes (torchrun) with DDP and with FSDP2: a run killed at step k resumes on one process and on
two, and its per-step losses match the uninterrupted two-process run within 1e-5."""
import os
import shutil
import subprocess

import pytest

from tests.train_support import (PY, ROOT, descendants, env, kill_after_steps, make_shards, run_trainer, signal_after_steps,
                                 tiny_model_json, write_toml)
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow  # trainer runs in subprocesses (make test-fast skips them)

STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-data")
    return {"shards": make_shards(str(root / "shards"), sequences=96, seq_len=32),
            "val": make_shards(str(root / "val"), sequences=8, seq_len=32, seed=9),
            "model": tiny_model_json(str(root / "gla.json"))}


def config(tmp_path, ds, mode, out, cpu_kernels="triton"):
    # triton (FLA's Triton kernels under the interpreter) by default: steps slow enough for kill_after to stop
    # the run mid-way; tests that kill nothing can take the PyTorch ops (model.cpu_kernels=torch)
    return write_toml(str(tmp_path / f"{out}.toml"), {
        "model": {"config": ds["model"], "cpu_kernels": cpu_kernels},
        "data": {"shards": ds["shards"], "global_batch": 4, "seed": 5, "val_shards": ds["val"], "val_sequences": 4},
        "train": {"max_steps": STEPS, "micro_batch": 2, "eval_every": 4},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup": 2},
        "checkpoint": {"every": 2, "keep": 3},
        "parallel": {"mode": mode},
        "run": {"out_dir": str(tmp_path / out), "progress": False}})


def kill_after(tmp_path, cfg, out_dir, lines: int):
    """Start a 2-process run and SIGKILL torchrun and both workers once `lines` steps are logged."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "trainer", cfg]
    kill_after_steps(cmd, str(tmp_path), out_dir, lines)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_killed_two_process_run_resumes_on_one_and_on_two(tmp_path, data, mode):
    run_trainer(str(tmp_path), config(tmp_path, data, mode, "full"), nproc=2)
    full_records = read_metrics(str(tmp_path / "full"))
    full = [r["loss"] for r in full_records]
    full_val = [r["val_loss"] for r in full_records if "val_loss" in r]
    assert len(full) == STEPS and len(full_val) == 2

    cfg = config(tmp_path, data, mode, "killed")
    kill_after(tmp_path, cfg, str(tmp_path / "killed"), lines=5)
    assert len(read_metrics(str(tmp_path / "killed"))) < STEPS
    shutil.copytree(tmp_path / "killed", tmp_path / "killed2")

    one = run_trainer(str(tmp_path), cfg, nproc=1)  # same config: global batch 4, now 2 micro-batches of 2
    assert "resumed from" in one.stderr and "saved by 2 ranks, now 1" in one.stderr
    two = run_trainer(str(tmp_path), cfg, f"run.out_dir={tmp_path / 'killed2'}", nproc=2)
    assert "resumed from" in two.stderr

    for out in ("killed", "killed2"):
        records = read_metrics(str(tmp_path / out))
        assert [r["step"] for r in records] == list(range(STEPS)), out
        for r, ref in zip(records, full):
            assert abs(r["loss"] - ref) < 1e-5, (out, r["step"], r["loss"], ref)
        val = [r["val_loss"] for r in records if "val_loss" in r]  # validation is reduced across ranks
        assert len(val) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(val, full_val)), (out, val, full_val)


def test_sigterm_to_one_rank_stops_both_after_the_same_step_with_one_checkpoint(tmp_path, data):
    # A scheduler's SIGTERM may reach the ranks a step apart; here it reaches rank 1 only. The ranks agree on the
    # step (a max over a gloo group at each boundary), save one complete checkpoint together and stop; the same
    # command resumes it.
    import signal
    cfg = config(tmp_path, data, "ddp", "out", cpu_kernels="torch")
    out = str(tmp_path / "out")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "trainer", cfg,
           "train.max_steps=1000000", "checkpoint.every=0", "checkpoint.at_end=false", "train.eval_every=0"]

    def rank1(proc):
        workers = [p for p in descendants(proc.pid) if b"LOCAL_RANK=1\0" in open(f"/proc/{p}/environ", "rb").read()]
        assert len(workers) == 1, workers
        return workers

    p = signal_after_steps(cmd, str(tmp_path), out, 3, signal.SIGTERM, target=rank1)
    n = len(read_metrics(out))
    assert f"stopped by SIGTERM after step {n} of 1000000: checkpoint {out}/ckpt/step-{n:06d}" in p.stderr, p.stderr[-4000:]
    assert os.listdir(os.path.join(out, "ckpt")) == [f"step-{n:06d}"]
    p = run_trainer(str(tmp_path), cfg, f"train.max_steps={n + 2}", nproc=2)
    assert f"step-{n:06d} at step {n} (saved by 2 ranks, now 2)" in p.stderr
    assert [r["step"] for r in read_metrics(out)] == list(range(n + 2))


def test_a_save_failing_on_one_rank_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path, data):
    cfg = config(tmp_path, data, "ddp", "out", cpu_kernels="torch")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "tests/fault_trainer.py", cfg]
    # Rank 1 cannot write its part of checkpoint 4 (disk full). Before, rank 0 waited for it at a barrier
    # forever; now both ranks learn of it and stop with the same error.
    p = subprocess.run(cmd, cwd=ROOT, env=dict(env(str(tmp_path)), FAULT_RANK="1", FAULT_STEP="4"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    out = tmp_path / "out"
    assert p.stderr.count(f"saving checkpoint {out}/ckpt/step-000004 failed (rank 1: OSError: [Errno 28] "
                          f"No space left on device") == 2, p.stderr[-4000:]
    assert sorted(os.listdir(out / "ckpt")) == ["step-000002"]  # no partial step-000004.tmp left
    assert [r["step"] for r in read_metrics(str(out))] == [0, 1, 2, 3]
    # Space freed: the same command resumes from step 2 and finishes.
    resumed = run_trainer(str(tmp_path), cfg, nproc=2)
    assert "resumed from" in resumed.stderr and "step-000002" in resumed.stderr
    assert [r["step"] for r in read_metrics(str(out))] == list(range(STEPS))


def test_bf16_precision_on_two_processes_equals_one(tmp_path, data):
    """train.precision=bf16 under ddp replicates without DDP: rank 0's weights are broadcast, each rank's bf16
    gradients go into its fp32 buffer, one all-reduce averages those. Halving is exact in floating point, so two
    processes (one micro-batch of 2 each) give the same steps as one (two micro-batches of 2, each loss / 2)."""
    cfg = config(tmp_path, data, "ddp", "bf16", cpu_kernels="torch")
    over = ("train.precision=bf16", "checkpoint.every=0")
    two = run_trainer(str(tmp_path), cfg, *over, f"run.out_dir={tmp_path / 'two'}", nproc=2)
    assert "precision bf16" in two.stderr
    run_trainer(str(tmp_path), cfg, *over, f"run.out_dir={tmp_path / 'one'}")
    one, both = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert len(one) == len(both) == STEPS
    for a, b in zip(one, both):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"], (a, b)
    # the CPU's unfused loss over the bf16 logits is computed in fp32 (build.use_fp32_loss), not rounded to bf16
    import torch
    assert sum(torch.tensor(r["loss"]).bfloat16().item() != r["loss"] for r in one) == len(one)
