"""Faults SeaweedFS cannot make on request: a response body cut off mid-transfer and a throttling
503, injected by a small HTTP proxy in front of the real server (requests pass through unchanged,
so SigV4 signatures still verify)."""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shards.s3 import S3Storage
from shards.storage import StorageError

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """Forwards every request to the server; ranged GETs take the next fault from `faults`
    ("cut": half the body, then the connection closes; "503": SlowDown; "pass")."""

    def __init__(self, target_port: int, faults):
        self.faults, self.lock = iter(faults), threading.Lock()
        self.served = []  # the fault each ranged GET got, in order
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    conn.putheader(k, v)
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                fault = "pass"
                if self.command == "GET" and "Range" in self.headers:
                    with proxy.lock:
                        fault = next(proxy.faults, "pass")
                        proxy.served.append(fault)
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                else:
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data[:len(data) // 2] if fault == "cut" else data)
                self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


DATA = bytes(range(256)) * 400


def test_cut_bodies_and_throttling_are_retried(s3_url, s3_env, monkeypatch):
    S3Storage(s3_url).put_bytes("0.tar", DATA)
    with FaultProxy(s3_env.ports["s3.port"], ["cut", "503", "cut"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        st = S3Storage(s3_url)
        before = st.http_requests
        assert st.read_range("0.tar", 1000, 50000) == DATA[1000:51000]
        assert st.stats["retries"] == 2  # the two cut bodies, retried here
        assert st.http_requests - before == 4  # the 503 was retried by botocore ('standard' mode)


class VirtualClock:
    """Time that only the retry loop's sleeps advance: requests take no time however busy the machine is,
    so the retries that fit in the budget are a function of the budget and the backoff alone."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_body_cut_every_time_gives_up_within_the_budget_naming_object_and_range(s3_url, s3_env, monkeypatch):
    S3Storage(s3_url).put_bytes("0.tar", DATA)
    monkeypatch.setenv("SHARDGEN_S3_RETRY_BUDGET", "1.5")
    with FaultProxy(s3_env.ports["s3.port"], iter(lambda: "cut", None)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        st = S3Storage(s3_url)
        st._clock = clock = VirtualClock()
        st._sleep = clock.sleep
        with pytest.raises(StorageError) as e:
            st.read_range("0.tar", 1000, 50000)
    msg = str(e.value)
    assert f"{s3_url}/0.tar bytes 1000-50999" in msg and "short read" in msg and "retry budget" in msg
    # Backoff 0.2, 0.4, 0.8 s (times a jitter in [0.5, 1]) fits in 1.5 s; the next, 1.6 s, would not: 3 retries
    # whatever the jitter, each one a new request that the server cut again, and no sleep past the budget.
    assert st.stats["retries"] == 3 and len(clock.sleeps) == 3 and "gave up after 4 attempts" in msg
    assert proxy.served == ["cut"] * 4
    assert all(0.5 * d <= s <= d for s, d in zip(clock.sleeps, (0.2, 0.4, 0.8))) and clock.now <= 1.5
