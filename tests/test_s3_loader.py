"""The loader reading shards from S3 (real SeaweedFS): the same batches as from local disk, for several
ranks and a resume; through a server crash and restart; and clear errors when it cannot be."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from shards.format import FormatError
from shards.s3 import S3Storage
from shards.storage import StorageError
from tests.s3_fixtures import s3_client_env, upload_dir
from tests.data_support import write_dataset
from trainer.data import TokenLoader

GLOBAL_BATCH = 8


@pytest.fixture
def datasets(s3_url, tmp_path):
    local = str(tmp_path / "shards")
    write_dataset(local, [[4] * 6] * 3)  # 3 shards of 6 blocks of 4 sequences
    upload_dir(local, s3_url)
    return local, s3_url


def batches(shards, steps: int, *, world_size: int = 1, rank: int = 0, start: int = 0, **kw):
    with TokenLoader(shards, seed=7, global_batch=GLOBAL_BATCH, world_size=world_size, rank=rank,
                     prefetch_steps=2, fetch_threads=4, **kw) as loader:
        it = loader.iter_batches(start)
        out = [(b.step, b.input_ids.numpy().copy(), b.sequences) for _, b in zip(range(steps), it)]
        it.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for (sa, xa, qa), (sb, xb, qb) in zip(a, b):
        assert sa == sb and qa == qb
        np.testing.assert_array_equal(xa, xb)


def test_batches_from_s3_equal_local_for_several_ranks_and_a_resume(datasets):
    local, url = datasets
    steps = 12  # 72 sequences, 8 per step: 9 steps per epoch, so this crosses into epoch 1
    for world_size in (1, 2, 4):
        for rank in range(world_size):
            assert_same(batches(url, steps, world_size=world_size, rank=rank),
                        batches(local, steps, world_size=world_size, rank=rank))
    whole = batches(url, steps, world_size=2, rank=1)
    assert_same(batches(url, steps - 5, world_size=2, rank=1, start=5), whole[5:])


def test_reads_survive_a_server_crash_and_restart(datasets, s3_env):
    local, url = datasets
    want = batches(local, 18)
    got = []
    restarted = threading.Event()

    def restart():
        # the event: the loader's reads have met the dead server (a retry counted), not a fixed delay
        try:
            deadline = time.monotonic() + 120
            while loader.storage.stats["retries"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            s3_env.start()
        finally:
            restarted.set()

    with TokenLoader(url, seed=7, global_batch=GLOBAL_BATCH, prefetch_steps=1, fetch_threads=4) as loader:
        it = loader.iter_batches(0)
        for _ in range(3):
            b = next(it)
            got.append((b.step, b.input_ids.numpy().copy(), b.sequences))
        s3_env.stop(kill=True)  # a crash, not a polite shutdown
        t = threading.Thread(target=restart)
        t.start()
        try:
            for _ in range(15):  # these steps' blocks are fetched while the server is down or starting
                b = next(it)
                got.append((b.step, b.input_ids.numpy().copy(), b.sequences))
        finally:
            t.join()
        it.close()
        assert loader.storage.stats["retries"] > 0  # the reads really did meet the dead server
    assert restarted.is_set()
    assert_same(got, want)


def test_server_down_longer_than_the_retry_budget_names_the_object(datasets, s3_env, monkeypatch):
    _, url = datasets
    monkeypatch.setenv("SHARDGEN_S3_RETRY_BUDGET", "2")
    monkeypatch.setenv("SHARDGEN_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    loader = TokenLoader(url, seed=7, global_batch=GLOBAL_BATCH, prefetch_steps=1)
    s3_env.stop(kill=True)
    try:
        with pytest.raises(StorageError) as e:
            next(loader.iter_batches(0))
        msg = str(e.value)
        assert url in msg and ".tar" in msg and "block" in msg and "retry budget" in msg
        assert s3_env.endpoint in msg and "AWS_ENDPOINT_URL" in msg
    finally:
        loader.close()
        s3_env.start()


def test_missing_manifest_and_deleted_shard_are_named(datasets):
    _, url = datasets
    with pytest.raises(FormatError, match=re.escape(f"{url}-nothing-here/manifest.json not found")):
        TokenLoader(url + "-nothing-here", seed=7, global_batch=GLOBAL_BATCH)
    S3Storage(url).delete("00001.tar")  # after the manifest was written
    with TokenLoader(url, seed=7, global_batch=GLOBAL_BATCH, prefetch_steps=0) as loader:
        with pytest.raises(StorageError) as e:
            for _ in loader.iter_batches(0):
                pass
    msg = str(e.value)
    assert f"{url}/00001.tar" in msg and "no such object" in msg and "block" in msg


def test_a_data_path_on_s3_that_does_not_exist_says_so(datasets):
    from shards.errors import NotFoundError
    from trainer.data.sources import check_path
    _, url = datasets
    check_path("data.shards", url)
    with pytest.raises(NotFoundError, match=re.escape(f"data.val_shards={url}-nothing-here does not exist (no "
                                                      f"objects under that prefix)")):
        check_path("data.val_shards", url + "-nothing-here")
    S3Storage(url).delete("manifest.json")  # shards without a manifest: read_manifest explains that case
    check_path("data.shards", url)


def test_wrong_credentials_and_missing_bucket_through_the_loader(datasets, monkeypatch):
    _, url = datasets
    bucket = url.split("/")[2]
    with pytest.raises(StorageError, match="bucket 'nobucket-x' does not exist"):
        TokenLoader(url.replace(bucket, "nobucket-x"), seed=7, global_batch=GLOBAL_BATCH)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret[::-1])
    with pytest.raises(StorageError, match="access denied.*AWS_SECRET_ACCESS_KEY") as e:
        TokenLoader(url, seed=7, global_batch=GLOBAL_BATCH)
    assert secret[::-1] not in str(e.value) and secret not in str(e.value)


@pytest.mark.slow
def test_credentials_never_appear_in_cli_output(datasets, s3_env, tmp_path):
    """The plan/stats CLIs on S3 shards, with good and bad credentials: grep everything for the secret."""
    local, url = datasets
    env = s3_client_env(s3_env, str(tmp_path))
    secret = env["AWS_SECRET_ACCESS_KEY"]
    bad = dict(env, AWS_SECRET_ACCESS_KEY="Zx" + secret[2:])
    outputs = []
    for e in (env, bad):
        for cmd in (["plan", "--seed", "3", "--steps", "2"], ["stats"]):
            r = subprocess.run([sys.executable, "-m", "trainer.data", *cmd, "--shards", url, "--global-batch", "8"],
                               env=e, capture_output=True, text=True, timeout=120)
            outputs.append(r.stdout + r.stderr)
            assert (r.returncode == 0) == (e is env), r.stderr
    assert "access denied" in outputs[-1]
    plan_local = subprocess.run([sys.executable, "-m", "trainer.data", "plan", "--seed", "3", "--steps", "2",
                                 "--shards", local, "--global-batch", "8"], capture_output=True, text=True)
    assert outputs[0] == plan_local.stdout  # the same plan whatever serves the bytes
    for out in outputs:
        assert secret not in out and bad["AWS_SECRET_ACCESS_KEY"] not in out
        assert env["AWS_ACCESS_KEY_ID"] not in out
