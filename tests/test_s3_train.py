"""Training from shards in S3 (real SeaweedFS): the same losses as from local disk, also when the
server crashes mid-run and comes back."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from tests.s3_fixtures import s3_client_env, upload_dir
from tests.train_support import PY, ROOT, env, make_shards, run_trainer, tiny_model_json, write_toml
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow  # trainer runs in subprocesses (make test-fast skips them)

STEPS = 10


@pytest.fixture
def data(tmp_path, s3_url):
    shards = make_shards(str(tmp_path / "shards"), sequences=96, seq_len=32)
    upload_dir(shards, s3_url)
    return {"local": shards, "s3": s3_url, "model": tiny_model_json(str(tmp_path / "gla.json"))}


def config(tmp_path, data, shards, name):
    return write_toml(str(tmp_path / f"{name}.toml"), {
        # FLA's Triton kernels under the interpreter: steps slow enough that the server is stopped mid-run
        "model": {"config": data["model"], "cpu_kernels": "triton"},
        "data": {"shards": shards, "global_batch": 4, "seed": 3, "prefetch_steps": 0},
        "train": {"max_steps": STEPS, "micro_batch": 2},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup": 2},
        "checkpoint": {"every": 0},
        "run": {"out_dir": str(tmp_path / name), "progress": False}})


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir)]


def test_training_from_s3_matches_local_through_a_server_crash(tmp_path, data, s3_env, monkeypatch):
    for k, v in s3_client_env(s3_env, str(tmp_path)).items():
        monkeypatch.setenv(k, v)  # run_trainer passes os.environ on
    run_trainer(str(tmp_path), config(tmp_path, data, data["local"], "local"))
    want = losses(str(tmp_path / "local"))
    assert len(want) == STEPS

    cmd = [PY, "-m", "trainer", config(tmp_path, data, data["s3"], "s3")]
    stdout = open(tmp_path / "s3.stdout", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(str(tmp_path)), stdout=stdout, stderr=subprocess.PIPE, text=True)
    lines, met_dead_server = [], threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if "retrying for up to" in line:
                met_dead_server.set()
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        metrics = tmp_path / "s3" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "the trainer made no progress"
            time.sleep(0.05)
        s3_env.stop(kill=True)  # mid-run: prefetch 0, so the next steps' blocks are read while it is down
        while not met_dead_server.wait(0.1):  # the event, not a guess at how long a step takes
            assert proc.poll() is None, "the run ended without meeting the dead server:\n" + "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "the trainer never read from the dead server"
        s3_env.start()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=60)
        stdout.seek(0)
        out = stdout.read()
        stdout.close()
    err = "".join(lines)
    assert proc.returncode == 0, err[-3000:]
    assert losses(str(tmp_path / "s3")) == want
    assert "retrying for up to" in err  # the reads really did meet the dead server
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for root, _, files in os.walk(tmp_path / "s3"):  # metrics, config, logs, checkpoint: no credentials
        for f in files:
            assert secret.encode() not in open(os.path.join(root, f), "rb").read(), f
    assert secret not in out + err
