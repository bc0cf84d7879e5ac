"""The local server module: `up`/`env`/`down` as `make s3-up`/`make s3-down` run them, LocalS3 stopping
the server also when the body fails, and start failures that say why."""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys

import pytest

from shards import s3server
from shards.s3server import LocalS3, S3Server, S3ServerError, free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shards.s3server", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=env)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_up_env_down(tmp_path):
    d = str(tmp_path / "s3")
    port = free_ports(1)[0]
    up = cli("up", "--dir", d, "--port", str(port), "--bucket", "demo")
    try:
        assert up.returncode == 0, up.stderr
        assert f"http://127.0.0.1:{port}" in up.stdout
        server = S3Server(d)
        assert server.pid() is not None and server.ports["s3.port"] == port
        assert server.secret_key not in up.stdout + up.stderr  # `up` never prints the secret; `env` does
        again = cli("up", "--dir", d, "--port", str(port))
        assert again.returncode == 1 and "already running" in again.stderr and "Traceback" not in again.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in cli("env", "--dir", d).stdout.splitlines())
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        probe = [sys.executable, "-c", "from shards.s3 import S3Storage; s = S3Storage('s3://demo/x'); "
                 "s.put_bytes('a', b'hello'); print(s.read('a').decode())"]
        env = {k: v for k, v in os.environ.items() if k not in s3server.AWS_VARS}
        got = subprocess.run(probe, cwd=ROOT, env={**env, **exports}, capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == "hello", got.stderr
    finally:
        down = cli("down", "--dir", d)
    assert down.returncode == 0 and "stopped pid" in down.stdout
    assert not listening(port) and S3Server(d).pid() is None
    assert not [p for p in server.ports.values() if glob.glob(f"/tmp/seaweedfs-*-grpc-{p}.sock")]
    assert "no server running" in cli("down", "--dir", d).stdout


def test_local_s3_stops_the_server_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"):
        with LocalS3(str(tmp_path / "s3")) as server:
            port = server.ports["s3.port"]
            assert listening(port)
            raise RuntimeError("the test failed")
    assert not listening(port) and server.pid() is None


def test_start_failures_say_why(tmp_path, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(S3ServerError, match=f"ports in use: s3.port={port}"):
            S3Server(str(tmp_path / "a"), port=port).start()
    monkeypatch.setattr(s3server, "find_weed", lambda: "/bin/false")
    with pytest.raises(S3ServerError, match=r"weed exited with status 1 while starting; log .*weed.log"):
        S3Server(str(tmp_path / "b")).start()


def test_an_internal_port_taken_since_the_last_start_is_replaced(tmp_path):
    # Clients know the S3 port only; weed's other ports are ephemeral ones recorded in ports.json at the
    # first `up`, and any program may hold one by the next `up`: that must not stop the server starting.
    server = S3Server(str(tmp_path / "s3"))
    s3_port, master = server.ports["s3.port"], server.ports["master.port"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", master))
        busy.listen()
        with LocalS3(server.dir) as started:
            assert started.ports["s3.port"] == s3_port and started.ports["master.port"] != master
            assert len(set(started.ports.values())) == len(started.ports)
            started.create_bucket("after-a-taken-port")
    assert S3Server(server.dir).ports == started.ports  # recorded for `env` and `down`


def test_up_with_a_bad_bucket_name_says_so_and_leaves_nothing_running(tmp_path):
    d = str(tmp_path / "s3")
    up = cli("up", "--dir", d, "--port", "0", "--bucket", "Bad_Bucket!")
    running = S3Server(d).pid()
    cli("down", "--dir", d)  # before the checks: a failing one must not leave a server behind
    assert up.returncode == 1 and "bucket 'Bad_Bucket!' could not be created" in up.stderr, up.stderr
    assert "Traceback" not in up.stderr and running is None
