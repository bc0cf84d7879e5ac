"""The Storage contract, the same for a local directory and an S3 bucket (real SeaweedFS), plus the
S3-only behaviours: multipart + verification, clear errors, credentials never shown."""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys

import pytest

from shards.s3 import S3Settings, S3Storage
from shards.storage import parse_s3_url
from shards.storage import LocalStorage, StorageError
from shards.backends import open_storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        st = LocalStorage(str(tmp_path / "root"))
    else:
        st = open_storage(request.getfixturevalue("s3_url"))
        assert isinstance(st, S3Storage)
    yield st
    st.close()


def _payload(n: int, seed: int = 0) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def test_put_read_exists_size(storage):
    data = _payload(5000)
    assert not storage.exists("a/b.bin")
    storage.put_bytes("a/b.bin", data)
    assert storage.exists("a/b.bin")
    assert storage.size("a/b.bin") == 5000
    assert storage.read("a/b.bin") == data
    storage.put_bytes("a/b.bin", b"replaced")  # overwrite is whole-object
    assert storage.read("a/b.bin") == b"replaced"
    storage.put_bytes("empty", b"")
    assert storage.read("empty") == b"" and storage.size("empty") == 0


def test_read_range(storage):
    data = _payload(10000)
    storage.put_bytes("x.tar", data)
    for off, n in [(0, 1), (0, 10000), (512, 1024), (9999, 1), (1234, 0)]:
        assert storage.read_range("x.tar", off, n) == data[off:off + n]


def test_read_range_past_end_names_object_and_range(storage):
    storage.put_bytes("x.tar", _payload(1000))
    for off, n in [(900, 200), (2000, 10)]:
        with pytest.raises(StorageError) as e:
            storage.read_range("x.tar", off, n)
        msg = str(e.value)
        assert storage.where("x.tar") in msg and f"{off}-{off + n - 1}" in msg and "short read" in msg


def test_missing_object_errors_name_it(storage):
    for call in (lambda: storage.read("nope/manifest.json"), lambda: storage.size("nope/manifest.json"),
                 lambda: storage.read_range("nope/manifest.json", 0, 10)):
        with pytest.raises(StorageError) as e:
            call()
        assert storage.where("nope/manifest.json") in str(e.value)
    assert storage.exists("nope/manifest.json") is False


def test_an_error_we_do_not_classify_carries_the_servers_reason(s3_url):
    st = S3Storage(s3_url)
    name = "k" * 2000  # S3 keys are at most 1024 bytes
    with pytest.raises(StorageError) as e:
        st.put_bytes(name, b"1")
    assert st.where(name) in str(e.value) and "KeyTooLong" in str(e.value) and "too long" in str(e.value)


def test_list_and_delete(storage):
    for name in ["b/2.tar", "a/1.tar", "a/0.tar", "manifest.json"]:
        storage.put_bytes(name, name.encode())
    assert storage.list() == ["a/0.tar", "a/1.tar", "b/2.tar", "manifest.json"]
    assert storage.list("a/") == ["a/0.tar", "a/1.tar"]
    assert storage.list("zzz") == []
    # sizes with the listing (on S3 from list_objects_v2 itself), equal to asking each object
    assert storage.list_sizes("a/") == [("a/0.tar", 7), ("a/1.tar", 7)] == [(n, storage.size(n)) for n in
                                                                          storage.list("a/")]
    storage.delete("a/0.tar")
    storage.delete("a/0.tar")  # deleting what is gone is not an error
    assert storage.list("a/") == ["a/1.tar"] and not storage.exists("a/0.tar")


def test_put_file_consumes_the_staged_file(storage):
    staging = storage.staging_dir()
    assert os.path.isdir(staging)
    path = os.path.join(staging, "00000.tar.part")
    data = _payload(70000, seed=1)
    with open(path, "wb") as f:
        f.write(data)
    storage.put_file("shards/00000.tar", path)
    assert not os.path.exists(path)
    assert storage.read("shards/00000.tar") == data


# --- S3 only
def test_multipart_upload_is_verified_against_the_servers_checksum(s3_url, tmp_path):
    st = S3Storage(s3_url, S3Settings(part_bytes=5 << 20))
    data = _payload((11 << 20) + 123, seed=2)  # 3 parts: 5 MiB, 5 MiB, the rest
    path = tmp_path / "big.tar"
    path.write_bytes(data)
    st.put_file("big.tar", str(path))  # raises if the composite SHA-256 the server reports differs
    head = st._client().head_object(Bucket=st.bucket, Key=st._key("big.tar"), ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-3")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()  # what a rerun's skip check reads
    assert st.read_range("big.tar", (5 << 20) - 10, 20) == data[(5 << 20) - 10:(5 << 20) + 10]
    with pytest.raises(StorageError, match="upload verification failed"):
        st._verify("big.tar", len(data), "00" * 32, [b"\0" * 32] * 3)
    assert not st._already_stored("never-uploaded", len(data), hashlib.sha256(data).hexdigest(), [])


def test_staging_dir_is_per_output_and_removed_once_empty(s3_url):
    st = S3Storage(s3_url)
    d = st.staging_dir()
    assert S3Storage(s3_url + "/").staging_dir() == d != S3Storage(s3_url + "x").staging_dir()
    os.makedirs(os.path.join(d, "_tmp"))
    with open(os.path.join(d, "_tmp", "00003-000.tar.tmp"), "wb"):
        pass
    st.close()
    assert os.path.exists(os.path.join(d, "_tmp", "00003-000.tar.tmp"))  # a rerun replaces it
    os.unlink(os.path.join(d, "_tmp", "00003-000.tar.tmp"))
    st.close()
    assert not os.path.exists(d)
    S3Storage(s3_url + "x").close()


@pytest.mark.slow
def test_bucket_names_differ_between_test_sessions():
    # Two sessions on one machine once used the same URLs, so the same staging folders in /tmp: one
    # session's shardgen rerun deleted the other's half-built shards.
    from tests.s3_fixtures import bucket_name
    other = subprocess.run([sys.executable, "-c", "from tests.s3_fixtures import bucket_name; print(bucket_name('x'))"],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    mine = bucket_name("x")
    assert other.split("-", 1)[1] != mine.split("-", 1)[1] and len(mine) <= 63


def test_a_staging_dir_that_is_a_link_is_refused(s3_url, tmp_path, monkeypatch):
    # The name is predictable, so in a shared /tmp another user can make it first (a link to their
    # folder, or their own folder) and change the shards between build and upload.
    monkeypatch.setenv("SHARDGEN_STAGING_DIR", str(tmp_path))
    st = S3Storage(s3_url)
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", st._staging_path())
    with pytest.raises(StorageError, match="is a link or another user's folder.*SHARDGEN_STAGING_DIR"):
        st.staging_dir()


def test_wrong_secret_gives_a_credentials_error_without_the_secret(s3_url, monkeypatch, capfd):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrongsecret-6f1d2c9a8b7e")
    st = S3Storage(s3_url)
    for call in (lambda: st.read("manifest.json"), lambda: st.exists("manifest.json"),
                 lambda: st.put_bytes("x", b"1"), lambda: st.list()):
        with pytest.raises(StorageError) as e:
            call()
        msg = str(e.value)
        assert "AWS_SECRET_ACCESS_KEY" in msg and "access denied" in msg and st.where("") in msg + "/"
        assert "wrongsecret-6f1d2c9a8b7e" not in msg and os.environ["AWS_ACCESS_KEY_ID"] not in msg
    out = capfd.readouterr()
    assert "wrongsecret" not in out.out + out.err


def test_unknown_access_key(s3_url, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTKNOWN12345")
    with pytest.raises(StorageError, match="InvalidAccessKeyId.*AWS_ACCESS_KEY_ID") as e:
        S3Storage(s3_url).read("manifest.json")
    assert "AKIDNOTKNOWN12345" not in str(e.value)


def test_missing_bucket_is_named(s3_env):
    st = S3Storage("s3://no-such-bucket-here/shards")
    for call in (lambda: st.read("manifest.json"), lambda: st.exists("manifest.json"),
                 lambda: st.size("manifest.json"), lambda: st.list(), lambda: st.put_bytes("x", b"1"),
                 lambda: st.read_range("0.tar", 0, 10)):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
            call()


def test_unreachable_endpoint_names_it_and_the_variable(s3_env, monkeypatch):
    from shards.s3server import free_ports
    port = free_ports(1)[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SHARDGEN_S3_RETRY_BUDGET", "1")
    monkeypatch.setenv("SHARDGEN_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as e:
        S3Storage("s3://bucket/x").read_range("0.tar", 0, 100)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}" in msg and "AWS_ENDPOINT_URL" in msg and "s3://bucket/x/0.tar" in msg
    assert "retry budget" in msg


def test_no_credentials(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no usable AWS credentials.*AWS_ACCESS_KEY_ID"):
        S3Storage("s3://bucket/x").read("manifest.json")


@pytest.mark.slow
def test_addressing_and_settings_from_env(s3_env, monkeypatch):
    st = S3Storage("s3://bucket/x")
    assert st._client().meta.config.s3["addressing_style"] == "path"  # auto: custom endpoint -> path
    monkeypatch.setenv("SHARDGEN_S3_ADDRESSING", "virtual")
    assert S3Storage("s3://bucket/x")._client().meta.config.s3["addressing_style"] == "virtual"
    monkeypatch.setenv("SHARDGEN_S3_ADDRESSING", "sideways")
    with pytest.raises(ValueError, match="SHARDGEN_S3_ADDRESSING"):
        S3Storage("s3://bucket/x")
    monkeypatch.setenv("SHARDGEN_S3_ADDRESSING", "auto")
    monkeypatch.setenv("SHARDGEN_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SHARDGEN_S3_READ_TIMEOUT"):
        S3Storage("s3://bucket/x")
    # a StorageError too, so the CLIs print one error line (they were tracebacks)
    with pytest.raises(StorageError, match="SHARDGEN_S3_READ_TIMEOUT"):
        S3Storage("s3://bucket/x")
    r = subprocess.run([sys.executable, "-m", "shardgen", "verify", "s3://"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 1 and "shardgen verify: error: 's3://' is not an s3://bucket/prefix URL" in r.stderr
    assert "Traceback" not in r.stderr


def test_urls():
    assert parse_s3_url("s3://bkt/a/b/") == ("bkt", "a/b/")
    assert S3Storage("s3://bkt/a/b/").where("m.json") == "s3://bkt/a/b/m.json"
    assert S3Storage("s3://bkt").where("m.json") == "s3://bkt/m.json"
    for bad in ["s3:///x", "http://bkt/x", "s3://KEY:SECRET@bkt/x"]:
        with pytest.raises(ValueError) as e:
            parse_s3_url(bad)
        assert "SECRET" not in str(e.value)


def test_pickle_carries_no_credentials(s3_url):
    st = S3Storage(s3_url)
    st.put_bytes("x", b"1")  # creates the client and resolves credentials
    blob = pickle.dumps(st)
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    assert pickle.loads(blob).read("x") == b"1"


def test_a_forked_child_gets_its_own_client(s3_url):
    st = S3Storage(s3_url)
    st.put_bytes("x", b"parent")
    parent_client = st._client()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reads through the same storage object, on its own connections
        ok = st._client() is not parent_client and st.read("x") == b"parent"
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"1" and st.read("x") == b"parent"


def test_an_app_logging_at_info_shows_no_boto_info_lines(s3_url):
    # a new user's trial: every S3 run printed botocore's "Found credentials in environment variables." and
    # "Found endpoint for s3 via: environment_global." (twice)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s'); "
            "from shards.backends import open_storage; st = open_storage(sys.argv[1]); "
            "st.put_bytes('x', b'1'); assert st.read('x') == b'1'; logging.getLogger('shards').info('done')")
    r = subprocess.run([sys.executable, "-c", code, s3_url], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "shards: done" in r.stderr  # INFO lines of ours still show
    assert "botocore" not in r.stderr and "Found credentials" not in r.stderr, r.stderr
