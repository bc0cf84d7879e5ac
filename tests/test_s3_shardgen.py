"""shardgen with s3:// output and s3:// inputs (real SeaweedFS): the same bytes as on local disk, a
killed rerun that does not upload again what is stored and verified, no credentials in its output."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from shardgen.build import run_build
from shards.s3 import S3Storage
from shardgen.lock import LEASE_SECONDS, LOCK_NAME, output_lock
from shardgen.output import BuildError, canonical_json, record_name
from tests.shardgen_testlib import (SEQ, build_options,
                                    ROOT_DIR, UNICODE_DOCS, make_docs, tiny_tokenizer, tree_bytes, write_jsonl,
                                    write_parquet, write_txt)
from tests.s3_fixtures import s3_client_env
from trainer.data import TokenLoader

__all__ = ["tiny_tokenizer"]
opts = build_options


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3corpus")
    docs = make_docs(40) + UNICODE_DOCS
    write_txt(str(d / "a_txt"), docs[:8])
    write_jsonl(str(d / "b.jsonl"), docs[8:25])
    write_jsonl(str(d / "c.jsonl.zst"), docs[25:35])
    write_parquet(str(d / "d.parquet"), docs[35:], row_group_size=4)
    return str(d)


def s3_tree(url: str) -> dict[str, bytes]:
    st = S3Storage(url)
    return {name: st.read(name) for name in st.list()}


def test_output_to_s3_equals_local_and_loads_the_same(tmp_path, corpus, tiny_tokenizer, s3_url):
    run_build(opts([corpus], tmp_path / "local", tiny_tokenizer))
    res = run_build(opts([corpus], s3_url, tiny_tokenizer, workers=2))
    assert res.manifest is not None
    local, remote = tree_bytes(str(tmp_path / "local")), s3_tree(s3_url)
    assert sorted(local) == sorted(remote) and local == remote  # shards, manifest, tokenizer, task records
    assert not [n for n in remote if n.startswith("_tmp")]
    with TokenLoader(s3_url, seed=1, global_batch=4) as a, TokenLoader(str(tmp_path / "local"), seed=1,
                                                                       global_batch=4) as b:
        for x, y in zip(a.iter_batches(0), b.iter_batches(0)):
            assert x.step == y.step and x.input_ids.equal(y.input_ids)
            if x.step == 5:
                break


def test_inputs_from_s3_prefix_and_glob(tmp_path, corpus, tiny_tokenizer, s3_url):
    st = S3Storage(s3_url)
    for dirpath, _, names in os.walk(corpus):
        for n in names:
            path = os.path.join(dirpath, n)
            st.put_bytes("corpus/" + os.path.relpath(path, corpus), open(path, "rb").read())
    run_build(opts([corpus], tmp_path / "from-local", tiny_tokenizer))
    for spec in (f"{s3_url}/corpus", f"{s3_url}/corpus/**"):  # ** as on disk: corpus/a_txt/ too
        out = tmp_path / ("from-s3-" + str(len(spec)))
        run_build(opts([spec], out, tiny_tokenizer))
        a, b = tree_bytes(str(tmp_path / "from-local")), tree_bytes(str(out))
        shards = sorted(n for n in a if n.endswith(".tar"))
        assert shards and shards == sorted(n for n in b if n.endswith(".tar"))
        assert all(a[n] == b[n] for n in shards) and a["tokenizer.json"] == b["tokenizer.json"]
        ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
        assert ma["shards"] == mb["shards"] and ma["totals"] == mb["totals"]
        assert mb["settings"]["inputs"] == [spec]  # the manifest says where the text came from
    with pytest.raises(Exception, match="no input files|matches no files"):
        run_build(opts([f"{s3_url}/corpus/*.csv"], tmp_path / "none", tiny_tokenizer))


def wait_for_server_clock_past(st: S3Storage, when, timeout: float = 60.0) -> None:
    """Return once an object written now gets a LastModified later than `when` (the server's clock, one-second
    resolution): the observable event the test needs, instead of a fixed sleep. The probe is deleted again."""
    c = st._client()
    key = f"clock-probe-{os.getpid()}-{time.monotonic_ns()}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            c.put_object(Bucket=st.bucket, Key=key, Body=b"")
            if c.head_object(Bucket=st.bucket, Key=key)["LastModified"] > when:
                return
            assert time.monotonic() < deadline, f"the S3 server's clock did not pass {when} in {timeout} s"
            time.sleep(0.05)
    finally:
        c.delete_object(Bucket=st.bucket, Key=key)


def test_rerun_after_a_kill_does_not_upload_verified_shards_again(tmp_path, corpus, tiny_tokenizer, s3_url):
    run_build(opts([corpus], s3_url, tiny_tokenizer))
    st = S3Storage(s3_url)
    before = s3_tree(s3_url)
    shards0 = [n for n in before if n.startswith("00000-")]
    assert shards0
    c = st._client()
    stamp = {n: c.head_object(Bucket=st.bucket, Key=st._key(n))["LastModified"] for n in shards0}
    # The state a kill leaves between publishing task 0's shards and writing its record:
    st.delete("manifest.json")
    st.delete(record_name(0))
    wait_for_server_clock_past(st, max(stamp.values()))  # LastModified has one-second resolution
    res = run_build(opts([corpus], s3_url, tiny_tokenizer))
    assert res.ran == [0]
    for n in shards0:
        assert c.head_object(Bucket=st.bucket, Key=st._key(n))["LastModified"] == stamp[n], f"{n} uploaded again"
    assert s3_tree(s3_url) == before


@pytest.mark.slow
def test_cli_to_s3_with_good_and_bad_credentials_never_prints_them(tmp_path, corpus, tiny_tokenizer, s3_url,
                                                                 s3_env):
    env = s3_client_env(s3_env, str(tmp_path))
    secret = env["AWS_SECRET_ACCESS_KEY"]
    args = [sys.executable, "-m", "shardgen", corpus, "--output", s3_url, "--tokenizer", tiny_tokenizer,
            "--seq-len", str(SEQ), "--block-bytes", "128", "--task-bytes", "1500", "--workers", "2"]
    good = subprocess.run(args, env=env, cwd=ROOT_DIR, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    bad_secret = secret[::-1]
    bad = subprocess.run(args, env=dict(env, AWS_SECRET_ACCESS_KEY=bad_secret), cwd=ROOT_DIR,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "access denied" in bad.stderr and "AWS_SECRET_ACCESS_KEY" in bad.stderr
    assert "Traceback" not in bad.stderr
    verify = subprocess.run([sys.executable, "-m", "shardgen", "verify", s3_url], env=env, cwd=ROOT_DIR,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr
    for out in (good.stdout, good.stderr, bad.stdout, bad.stderr, verify.stdout, verify.stderr):
        assert secret not in out and bad_secret not in out and env["AWS_ACCESS_KEY_ID"] not in out


def test_an_s3_output_is_leased_to_one_run(corpus, tiny_tokenizer, s3_url):
    st = S3Storage(s3_url)
    lease = {"run": "pid 4242 on other-host, started 2026-01-01 00:00:00 UTC", "token": "x", "renewed": time.time()}
    st.put_bytes(LOCK_NAME, canonical_json(lease))
    with pytest.raises(BuildError, match=r"another shardgen run holds its lease .*\(pid 4242 on other-host.*"
                                         r"--break-lock"):
        run_build(opts([corpus], s3_url, tiny_tokenizer))
    assert not st.exists("manifest.json") and json.loads(st.read(LOCK_NAME))["token"] == "x"  # nothing touched
    log = io.StringIO()
    run_build(opts([corpus], s3_url, tiny_tokenizer, break_lock=True, log=log))
    assert "taking over the lease" in log.getvalue() and "(--break-lock; held by pid 4242" in log.getvalue()
    assert LOCK_NAME not in st.list()  # released at the end
    # A lease not renewed for LEASE_SECONDS belongs to a dead run: taken over without the flag.
    st.put_bytes(LOCK_NAME, canonical_json({**lease, "renewed": time.time() - LEASE_SECONDS - 1}))
    log = io.StringIO()
    assert run_build(opts([corpus], s3_url, tiny_tokenizer, log=log)).ran == []
    assert "(expired; held by pid 4242" in log.getvalue() and LOCK_NAME not in st.list()


def test_a_lease_is_renewed_and_a_run_whose_lease_was_taken_fails(s3_url, monkeypatch):
    import shardgen.lock
    monkeypatch.setattr(shardgen.lock, "HEARTBEAT_SECONDS", 0.02)
    st = S3Storage(s3_url)
    with pytest.raises(BuildError, match="was taken over by pid 7 on b while it ran"):
        with output_lock(st) as lease:
            first = json.loads(st.read(LOCK_NAME))
            deadline = time.monotonic() + 60
            while json.loads(st.read(LOCK_NAME))["renewed"] == first["renewed"]:
                assert time.monotonic() < deadline, "the lease was never renewed"
                time.sleep(0.01)
            st.put_bytes(LOCK_NAME, canonical_json({**first, "token": "other", "run": "pid 7 on b"}))
            lease.thread.join(timeout=60)  # the renewal sees the other token and stops
            assert lease.lost == "taken over by pid 7 on b"
    assert json.loads(st.read(LOCK_NAME))["token"] == "other"  # the other run's lease is left alone
