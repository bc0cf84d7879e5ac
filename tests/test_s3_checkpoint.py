"""Checkpoints in object storage (checkpoint.dir=s3://..., the real SeaweedFS server of tests/s3_fixtures.py):
save/load/prune, a failed upload, kill-and-resume (bitwise), 2 processes saving and 1 resuming, a damaged
checkpoint skipped for the previous one, and export from S3."""
from __future__ import annotations

import os

import pytest
import torch

from trainer.parallel import Dist


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt


def _objects(url: str) -> list[str]:
    from shards.s3 import S3Storage
    return S3Storage(url).list()


def test_ranged_reader_returns_the_bytes_and_fetches_each_block_about_once(tmp_path, monkeypatch):
    """The read stream DCP gets (blocks kept, large reads straight through), over any Storage: here a local
    one, whose read_range is the same call S3Storage serves with a ranged GET."""
    import io
    import random

    from shards.rangefile import RangeFile
    from shards.storage import LocalStorage
    data = random.Random(0).randbytes(50_000)
    (tmp_path / "obj").write_bytes(data)
    store = LocalStorage(str(tmp_path))
    fetched = []
    real = store.read_range
    monkeypatch.setattr(store, "read_range", lambda n, o, k: fetched.append(k) or real(n, o, k))
    f = io.BufferedReader(RangeFile(store, "obj", len(data), block=4096, max_get=3 * 4096), buffer_size=512)
    assert f.read() == data and sum(fetched) <= len(data) + 4096  # in order: each byte about once
    rng = random.Random(1)
    for _ in range(300):
        pos, n = rng.randrange(len(data) + 10), rng.choice([1, 7, 100, 5000, 20000, 60000])
        f.seek(pos)
        assert f.read(n) == data[pos:pos + n], (pos, n)
    f.seek(-10, io.SEEK_END)
    assert f.read() == data[-10:]


@pytest.mark.slow
def test_staged_files_of_a_killed_process_are_removed(s3_url):
    import subprocess
    import sys

    from shards.s3 import S3Storage
    from trainer.checkpoint import Checkpointer
    from trainer.dcp_storage import staging_folder
    root = s3_url + "/ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, mine = staging_folder(S3Storage(root), int(dead)), staging_folder(S3Storage(root))
    for folder in (stale, mine):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, ".__0_0.distcp.x.part"), "wb").close()
    Checkpointer(root, keep=1, d=Dist())
    assert not os.path.exists(stale) and os.path.exists(mine)
    import shutil
    shutil.rmtree(mine)
    S3Storage(root).close()  # the staging folder this test made


def test_save_load_and_prune_in_object_storage(s3_url):
    from shards.s3 import S3Storage
    from trainer.checkpoint import Checkpointer, list_checkpoints
    root = s3_url + "/ckpt"
    model, opt = _tiny()
    ckpt = Checkpointer(root, keep=2, d=Dist())
    assert type(ckpt.backend).__name__ == "ObjectStoreDCP"
    S3Storage(root).put_bytes("step-000009/__0_0.distcp", b"a killed save's leftovers")  # no train_state.json
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        path = ckpt.save(step, model, opt, {"loader": {"layout": 4}})
        assert path == f"{root}/step-{step:06d}"
    assert list_checkpoints(root) == [f"{root}/step-000002", f"{root}/step-000003"]
    names = _objects(root)
    assert not [n for n in names if n.startswith(("step-000001/", "step-000009/"))]  # pruned
    assert "step-000003/train_state.json" in names and "step-000003/.metadata" in names
    assert "step-000003/rng/rank-00000.pt" in names
    want = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_opt = _tiny()
    state = ckpt.load_latest(fresh, fresh_opt)
    assert state["step"] == 3 and state["path"] == f"{root}/step-000003" and state["loader"] == {"layout": 4}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert ckpt.latest_loader_state() == {"layout": 4}


@pytest.mark.parametrize("failing_file", [0, -1])
def test_a_failed_upload_raises_and_leaves_no_checkpoint(s3_url, monkeypatch, failing_file):
    # DCP's writer threads: the last file is usually the main thread's (DCP raises), the first one another
    # thread's (DCP drops the error: the Checkpointer finds it in its file system's record)
    from shards.s3 import S3Storage
    from shards.storage import StorageError
    from trainer.checkpoint import CheckpointError, Checkpointer, list_checkpoints
    root = s3_url + "/ckpt"
    model, opt = _tiny()
    ckpt = Checkpointer(root, keep=3, d=Dist(), threads=4)
    ckpt.save(1, model, opt, {})
    files = sorted(n for n in _objects(root) if n.endswith(".distcp"))
    assert len(files) > 1, files  # several writer threads
    real = S3Storage.put_file

    def failing(self, name, local_path):
        if name.endswith(files[failing_file].split("/")[-1]):
            raise StorageError(f"{self.where(name)}: injected upload failure")
        return real(self, name, local_path)
    monkeypatch.setattr(S3Storage, "put_file", failing)
    with pytest.raises(CheckpointError, match=r"saving checkpoint .*step-000002 failed .*injected upload failure"):
        ckpt.save(2, model, opt, {})
    monkeypatch.setattr(S3Storage, "put_file", real)  # (not undo(): that would drop s3_env's AWS_* too)
    assert list_checkpoints(root) == [f"{root}/step-000001"]
    assert not [n for n in _objects(root) if n.startswith("step-000002/")]
    assert ckpt.load_latest(*_tiny())["step"] == 1


# ---------------------------------------------------------------- the trainer end to end (subprocesses)
import subprocess  # noqa: E402
import time  # noqa: E402

from tests.train_support import (PY, ROOT, env, kill_after_steps, make_shards, run_trainer, tiny_model_json,  # noqa: E402
                                 write_toml)
from trainer.metrics import read_metrics  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-ckpt-data")
    return {"shards": make_shards(str(root / "shards"), sequences=96, seq_len=32),
            "model": tiny_model_json(str(root / "gla.json")), "root": root}


def config(tmp_path, ds, name, ckpt_dir=None, steps=STEPS, cpu_kernels="torch", **extra):
    # A constant learning rate after warm-up (min_lr = lr): the losses of steps 0-3 do not depend on max_steps,
    # so runs of 4 and of 6 steps compare with one reference run
    sections = {"model": {"config": ds["model"], "cpu_kernels": cpu_kernels},
                "data": {"shards": ds["shards"], "global_batch": 4, "seed": 3},
                "train": {"max_steps": steps, "micro_batch": 2},
                "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup": 2},
                "checkpoint": {"every": 2, "keep": 3, **({"dir": ckpt_dir} if ckpt_dir else {})},
                "run": {"out_dir": str(tmp_path / name), "progress": False}}
    for sec, table in extra.items():
        sections.setdefault(sec, {}).update(table)
    return write_toml(str(tmp_path / f"{name}.toml"), sections)


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir)]


@pytest.fixture(scope="module")
def reference(data):
    """One process, PyTorch CPU ops, checkpoints on local disk: the losses and final weights to match."""
    tmp = data["root"] / "reference"
    tmp.mkdir()
    run_trainer(str(tmp), config(tmp, data, "out"))
    from trainer.export import load_checkpoint_model
    model, _, path = load_checkpoint_model(str(tmp / "out"))
    assert path.endswith("step-000006")
    return {"losses": losses(str(tmp / "out")), "weights": model.state_dict()}


@pytest.mark.slow
def test_damaged_checkpoint_in_s3_is_named_and_the_previous_is_used_then_export(tmp_path, data, reference, s3_url):
    from shards.s3 import S3Storage
    from trainer.checkpoint import list_checkpoints
    from trainer.export import load_checkpoint_model
    root = s3_url + "/ckpt"
    cfg = config(tmp_path, data, "out", ckpt_dir=root)
    t = time.perf_counter()
    p = run_trainer(str(tmp_path), cfg, "train.max_steps=4")
    first_run_s = time.perf_counter() - t
    assert f"checkpoints in {root}" in p.stderr
    assert not os.path.exists(tmp_path / "out" / "ckpt")  # nothing on the local disk
    assert list_checkpoints(root) == [f"{root}/step-000002", f"{root}/step-000004"]
    store = S3Storage(root)
    assert sorted(store.list("run/")) == ["run/config.toml", "run/data.json", "run/model.json", "run/tokenizer.json"]
    assert f'dir = "{root}"' in (tmp_path / "out" / "config.toml").read_text()
    store.delete("step-000004/__0_0.distcp")  # damaged: one object lost
    store.put_bytes("step-000006/__0_0.distcp", b"a killed save")  # incomplete: no train_state.json
    t = time.perf_counter()
    p = run_trainer(str(tmp_path), cfg)
    print(f"first run (4 steps, 2 saves) {first_run_s:.1f}s; resume + 4 steps + 2 saves {time.perf_counter() - t:.1f}s")
    assert f"checkpoint {root}/step-000004 is damaged: file __0_0.distcp is missing" in p.stderr
    assert f"resumed from {root}/step-000002 at step 2" in p.stderr
    assert losses(str(tmp_path / "out")) == reference["losses"]  # bitwise: S3 round trip and resume are exact
    assert list_checkpoints(root) == [f"{root}/step-000002", f"{root}/step-000004", f"{root}/step-000006"]
    assert S3Storage(root).exists("step-000004/__0_0.distcp")  # redone

    # export: the run dir (its config.toml names the s3:// checkpoint.dir) and one s3:// checkpoint directly
    model, run_dir, path = load_checkpoint_model(str(tmp_path / "out"))
    assert path == f"{root}/step-000006" and run_dir == str(tmp_path / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference["weights"][k]), k
    hf = str(tmp_path / "hf")
    e = subprocess.run([PY, "-m", "trainer.export", f"{root}/step-000006", hf], cwd=ROOT, env=env(str(tmp_path)),
                       capture_output=True, text=True)
    assert e.returncode == 0, e.stderr[-3000:]
    from safetensors.torch import load_file
    exported = load_file(os.path.join(hf, "model.safetensors"))
    for k, v in reference["weights"].items():
        assert torch.equal(exported[k], v), k
    assert os.path.isfile(os.path.join(hf, "tokenizer.json"))

    # no train_state.json: not a checkpoint; the run dir exports the one before
    store.delete("step-000006/train_state.json")
    assert load_checkpoint_model(str(tmp_path / "out"))[2] == f"{root}/step-000004"
    e = subprocess.run([PY, "-m", "trainer.export", f"{root}/step-000008", hf], cwd=ROOT, env=env(str(tmp_path)),
                       capture_output=True, text=True)
    assert e.returncode == 1 and "step-000008" in e.stderr and "train_state.json missing" in e.stderr


@pytest.mark.slow
def test_two_process_run_saves_to_s3_and_resumes_on_one(tmp_path, data, reference, s3_url):
    root = s3_url + "/ckpt"
    cfg = config(tmp_path, data, "out", ckpt_dir=root, parallel={"mode": "ddp"})
    run_trainer(str(tmp_path), cfg, "train.max_steps=4", nproc=2)
    one = run_trainer(str(tmp_path), cfg)  # elastic: 2 ranks -> 1, the same global batch
    assert f"resumed from {root}/step-000004 at step 4 (saved by 2 ranks, now 1)" in one.stderr
    got = losses(str(tmp_path / "out"))
    assert [s for s, _ in got] == list(range(STEPS))
    for (_, a), (_, b) in zip(got, reference["losses"]):
        assert abs(a - b) < 1e-5, (got, reference["losses"])


@pytest.mark.slow
def test_sigkill_with_checkpoints_in_s3_resumes_bitwise(tmp_path, data, s3_url):
    """Killed mid-run (FLA's kernels under the interpreter: steps slow enough to kill between the checkpoint
    at step 4 and the end), rerun: the same per-step losses as an uninterrupted run, bit for bit."""
    steps = 8
    full = config(tmp_path, data, "full", steps=steps, cpu_kernels="triton")
    run_trainer(str(tmp_path), full)
    root = s3_url + "/ckpt"
    killed = config(tmp_path, data, "killed", ckpt_dir=root, steps=steps, cpu_kernels="triton")
    # steps 0-4 done: checkpoint 4 is saved
    kill_after_steps([PY, "-m", "trainer", killed], str(tmp_path), str(tmp_path / "killed"), 5)
    assert len(losses(str(tmp_path / "killed"))) < steps
    p = run_trainer(str(tmp_path), killed)
    assert f"resumed from {root}/step-0000" in p.stderr
    assert losses(str(tmp_path / "killed")) == losses(str(tmp_path / "full"))  # exact float equality
