"""S3Storage: the Storage interface on an S3-compatible bucket (AWS S3, R2, MinIO, Ceph, SeaweedFS, GCS).

Configuration is the standard AWS one, so an existing setup just works: credentials from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), AWS_PROFILE or ~/.aws/{config,credentials};
the endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or `endpoint_url` in the profile; the
retry mode and attempts from AWS_RETRY_MODE / AWS_MAX_ATTEMPTS (default: standard, 5). Ours:

    SHARDGEN_S3_ADDRESSING      auto (default) | path | virtual. auto = path-style for a custom endpoint
                                (MinIO, SeaweedFS, Ceph... rarely have wildcard DNS), the AWS default otherwise
    SHARDGEN_S3_CONNECT_TIMEOUT seconds, default 5
    SHARDGEN_S3_READ_TIMEOUT    seconds, default 30
    SHARDGEN_S3_RETRY_BUDGET    seconds, default 120: total time one read or write may spend retrying
                                transient failures (5xx, throttling, connection errors, cut-off bodies)
    SHARDGEN_S3_MAX_POOL        HTTP connections per process, default 32 (loader prefetch + upload threads)
    SHARDGEN_S3_PART_MB         multipart part size in MiB, default 16 (files this big or larger go multipart)
    SHARDGEN_STAGING_DIR        where shards are built before upload, default the system temp dir
                                (one folder per output URL, shared by a run's processes and its rerun)

Integrity: uploads send a SHA-256 per request (ChecksumAlgorithm=SHA256), which the server checks on
receipt; afterwards the object's size and the server's SHA-256 (full, or composite `-N` for multipart,
recomputed here from the local parts) are compared with the local file. A server that reports no
checksum gets the object re-read and hashed instead. An object already stored with the same size and
SHA-256 is not uploaded again (a rerun after a kill rebuilds identical shards). Credentials never
appear in messages: every message passes a redactor that knows the resolved key id, secret and token.
Errors and retries are reported per object: `s3://bucket/key bytes a-b: <what happened>: <what to do>`.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from shards.storage import S3ConfigError, Storage, StorageError, parse_s3_url

log = logging.getLogger("shards.s3")
# boto's INFO lines ("Found credentials in environment variables", "Found endpoint for s3 via ...") are noise in an
# app that logs at INFO: quiet them, unless the user has set those loggers' levels themselves
for _name in ("boto3", "botocore", "s3transfer", "urllib3"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)
DEFAULT_REGION = "us-east-1"
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                   "OperationAborted"}
_AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "ExpiredToken",
               "TokenRefreshRequired", "AllAccessDisabled", "InvalidSecurity", "403", "Forbidden"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_HASH_CHUNK = 1 << 20


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise S3ConfigError(f"{name}={raw!r} is not a number") from None
    if v <= 0:
        raise S3ConfigError(f"{name}={raw!r} must be positive")
    return v


@dataclass
class S3Settings:
    addressing: str = "auto"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retry_budget_s: float = 120.0
    max_pool_connections: int = 32
    part_bytes: int = 16 << 20

    @classmethod
    def from_env(cls) -> "S3Settings":
        addressing = os.environ.get("SHARDGEN_S3_ADDRESSING", "auto") or "auto"
        if addressing not in ("auto", "path", "virtual"):
            raise S3ConfigError(f"SHARDGEN_S3_ADDRESSING={addressing!r}: use auto, path or virtual")
        part_mb = _env_float("SHARDGEN_S3_PART_MB", 16)
        if part_mb < 5:
            raise S3ConfigError(f"SHARDGEN_S3_PART_MB={part_mb:g}: S3 multipart parts are at least 5 MiB")
        return cls(addressing=addressing,
                   connect_timeout=_env_float("SHARDGEN_S3_CONNECT_TIMEOUT", 5.0),
                   read_timeout=_env_float("SHARDGEN_S3_READ_TIMEOUT", 30.0),
                   retry_budget_s=_env_float("SHARDGEN_S3_RETRY_BUDGET", 120.0),
                   max_pool_connections=int(_env_float("SHARDGEN_S3_MAX_POOL", 32)),
                   part_bytes=int(part_mb * (1 << 20)))


class _Transient(Exception):
    """A failure worth retrying (cut-off body, throttling, 5xx, connection)."""


class _ObjectTooShort(Exception):
    def __init__(self, size: int):
        self.size = size


class S3Storage(Storage):
    # The retry loop's clock and sleep. Tests give an instance a virtual clock that only its sleeps advance,
    # so how many retries fit in the budget does not depend on how busy the machine is.
    _clock = staticmethod(time.monotonic)
    _sleep = staticmethod(time.sleep)

    def __init__(self, url: str, settings: S3Settings | None = None):
        self.bucket, prefix = parse_s3_url(url)
        self.prefix = prefix.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.settings = settings or S3Settings.from_env()
        self._lock = threading.Lock()  # guards the client's creation and the counters
        self._client_obj = None
        self._client_pid = None
        self._secrets: list[str] = []
        self._credential_source = "unknown"
        self._bucket_checked = False
        # Counters for benchmarks and tests: HTTP requests sent (botocore's own retries included),
        # retries made by the budgeted loop here, and payload bytes read.
        self.stats = {"retries": 0, "bytes_read": 0, "uploads_skipped": 0}
        self._requests = [0]

    # --- the client, created lazily and again after a fork (a forked socket pool is shared and unsafe)
    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_lock", "_client_obj", "_client_pid", "_secrets"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._client_obj = self._client_pid = None
        self._secrets = []

    def _client(self):
        if self._client_pid is not None and self._client_pid != os.getpid():
            # First use in a forked child: the parent's lock may have been held at fork time.
            self._lock, self._client_obj, self._client_pid = threading.Lock(), None, None
        if self._client_obj is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client_obj is None or self._client_pid != os.getpid():
                    shared = _shared_client(self.settings)
                    self._client_obj, self._secrets, self._credential_source, self._requests = shared
                    self._client_pid = os.getpid()
        return self._client_obj

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    @property
    def http_requests(self) -> int:
        """HTTP requests sent by this process's client for these settings (shared by storages)."""
        self._client()
        return self._requests[0]

    @property
    def endpoint(self) -> str:
        return self._client().meta.endpoint_url

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, message: str) -> StorageError:
        return StorageError(self.redact(message))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    # --- retries and error messages
    def _retrying(self, what: str, fn, missing_ok: bool = False):
        """fn() with retries on transient failures, within the total budget; clear errors otherwise."""
        budget = self.settings.retry_budget_s
        start = self._clock()
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as e:  # classified below; nothing is swallowed
                if missing_ok and _is_missing_key(e):
                    return None
                if not _is_transient(e):
                    raise self._explain(e, what) from None
                elapsed = self._clock() - start
                if elapsed + delay > budget:
                    raise self._error(
                        f"{what}: gave up after {attempt} attempts in {elapsed:.1f} s (retry budget "
                        f"SHARDGEN_S3_RETRY_BUDGET={budget:g} s); last error: {self._describe(e)}") from None
                self._count("retries")
                if attempt == 1:  # once per operation: visible, not a flood
                    log.warning("%s", self.redact(f"{what}: {self._describe(e)}; retrying for up to {budget:g} s"))
                self._sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)

    def _describe(self, e: Exception) -> str:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        if isinstance(e, BotoConnectionError):
            return (f"cannot reach the S3 endpoint {self.endpoint} ({type(e).__name__}): is the server up? "
                    f"set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) to your store's URL")
        from botocore.exceptions import IncompleteReadError, ResponseStreamingError
        if isinstance(e, (_Transient, IncompleteReadError, ResponseStreamingError)):
            return f"short read from {self.endpoint}: the response body was cut off ({e})"
        code, status = _error_code(e)
        if code:
            said = e.response.get("Error", {}).get("Message")  # the server's reason, e.g. "Your key is too long."
            return f"{code} (HTTP {status}) from {self.endpoint}" + (f": {said}" if said else "")
        return f"{type(e).__name__} from {self.endpoint}: {e}"

    def _explain(self, e: Exception, what: str) -> StorageError:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return self._error(f"{what}: no usable AWS credentials ({type(e).__name__}): set AWS_ACCESS_KEY_ID "
                               f"and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / ~/.aws/credentials")
        if isinstance(e, _ObjectTooShort):
            return self._error(f"{what}: short read: the object has only {e.size} bytes (truncated or replaced "
                               f"shard? run `python -m shardgen verify`)")
        code, status = _error_code(e)
        if code == "NoSuchBucket":
            return self._error(f"{what}: bucket '{self.bucket}' does not exist at {self.endpoint}: create it or "
                               f"fix the URL (and AWS_ENDPOINT_URL if the bucket is on another store)")
        if code in _AUTH_CODES or status == 403:
            return self._error(
                f"{what}: access denied by {self.endpoint} ({code}): the credentials (from "
                f"{self._credential_source}) are wrong or lack permission; check AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE, and AWS_ENDPOINT_URL")
        if code in _MISSING_KEY_CODES or status == 404:
            self._check_bucket(what)
            return self._error(f"{what}: no such object (deleted after the manifest was written? "
                               f"regenerate the shards or fix the URL)")
        if code == "InvalidRange":
            return self._error(f"{what}: short read: the range starts beyond the end of the object "
                               f"(truncated or replaced shard? run `python -m shardgen verify`)")
        if isinstance(e, ValueError):  # our own validation (bad range, bad settings)
            return self._error(f"{what}: {e}")
        return self._error(f"{what}: {self._describe(e)}")

    def _check_bucket(self, what: str) -> None:
        """A HEAD 404 cannot tell a missing bucket from a missing key: ask once, name the bucket."""
        if self._bucket_checked:
            return
        try:
            self._client().head_bucket(Bucket=self.bucket)
            self._bucket_checked = True
        except Exception as e:
            code, status = _error_code(e)
            if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
                raise self._error(f"{what}: bucket '{self.bucket}' does not exist at {self.endpoint}: create it "
                                  f"or fix the URL (and AWS_ENDPOINT_URL if the bucket is on another store)") from None

    # --- reading
    def exists(self, name):
        def head():
            return self._client().head_object(Bucket=self.bucket, Key=self._key(name))
        found = self._retrying(self.where(name), head, missing_ok=True)
        if found is None:
            self._check_bucket(self.where(name))
        return found is not None

    def size(self, name):
        r = self._retrying(self.where(name), lambda: self._client().head_object(Bucket=self.bucket,
                                                                                 Key=self._key(name)))
        return int(r["ContentLength"])

    def read(self, name):
        def get():
            r = self._client().get_object(Bucket=self.bucket, Key=self._key(name))
            return _read_body(r, int(r["ContentLength"]))
        data = self._retrying(self.where(name), get)
        self._count("bytes_read", len(data))
        return data

    def read_range(self, name, offset, length):
        if offset < 0 or length < 0:
            raise self._error(f"{self.where(name)}: invalid range offset={offset} length={length}")
        if length == 0:
            return b""
        last = offset + length - 1

        def get():
            r = self._client().get_object(Bucket=self.bucket, Key=self._key(name), Range=f"bytes={offset}-{last}")
            total = _total_from_content_range(r.get("ContentRange"))
            if total is not None and total < offset + length:
                raise _ObjectTooShort(total)
            return _read_body(r, length)
        data = self._retrying(f"{self.where(name)} bytes {offset}-{last}", get)
        self._count("bytes_read", length)
        return data

    def list(self, prefix=""):
        return [name for name, _ in self.list_sizes(prefix)]

    def list_sizes(self, prefix=""):
        root = f"{self.prefix}/" if self.prefix else ""

        def list_all():
            out = []
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=root + prefix)
            for page in pages:
                out.extend((o["Key"][len(root):], int(o["Size"])) for o in page.get("Contents", []))
            return sorted(out)
        return self._retrying(self.where(prefix + "*"), list_all)

    # --- writing
    def put_bytes(self, name, data):
        data = bytes(data)
        digest = hashlib.sha256(data).digest()

        def put():
            self._client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                      ChecksumSHA256=base64.b64encode(digest).decode(),
                                      Metadata={"sha256": digest.hex()})
        self._retrying(self.where(name), put)
        self._verify(name, len(data), digest.hex(), [digest])

    def put_file(self, name, local_path):
        from boto3.s3.transfer import TransferConfig
        from s3transfer.manager import TransferManager
        from s3transfer.utils import ChunksizeAdjuster

        size = os.path.getsize(local_path)
        part = ChunksizeAdjuster().adjust_chunksize(self.settings.part_bytes, size)
        full_hex, part_digests = _sha256_file(local_path, part)
        config = TransferConfig(multipart_threshold=self.settings.part_bytes, multipart_chunksize=part,
                                max_concurrency=max(1, min(8, self.settings.max_pool_connections)),
                                use_threads=True)
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": full_hex}}
        if self._already_stored(name, size, full_hex, part_digests):
            # A rerun after a kill rebuilds the same bytes: what is stored and verified stays.
            self._count("uploads_skipped")
            os.unlink(local_path)
            return

        def upload():
            with TransferManager(self._client(), config) as tm:
                tm.upload(local_path, self.bucket, self._key(name), extra_args=extra).result()
        self._retrying(self.where(name), upload)
        self._verify(name, size, full_hex, part_digests)
        os.unlink(local_path)

    def _verify(self, name: str, size: int, full_hex: str, part_digests: list[bytes]) -> None:
        """The stored object has our size and SHA-256 (the server's checksum, else a re-read)."""
        where = self.where(name)
        head = self._retrying(where, lambda: self._client().head_object(
            Bucket=self.bucket, Key=self._key(name), ChecksumMode="ENABLED"))
        if int(head["ContentLength"]) != size:
            raise self._error(f"{where}: upload verification failed: the store holds {head['ContentLength']} "
                              f"bytes, the local file has {size}; rerun to upload it again")
        stored = head.get("ChecksumSHA256")
        if stored:
            want = _expected_checksum(stored, full_hex, part_digests)
            if stored != want:
                raise self._error(f"{where}: upload verification failed: the store's SHA-256 {stored} differs "
                                  f"from the local file's {want}; rerun to upload it again")
            return
        got = hashlib.sha256(self.read(name)).hexdigest()  # the server keeps no checksum: hash what it serves
        if got != full_hex:
            raise self._error(f"{where}: upload verification failed: the stored bytes hash to {got}, the local "
                              f"file to {full_hex}; rerun to upload it again")

    def _already_stored(self, name: str, size: int, full_hex: str, part_digests: list[bytes]) -> bool:
        """`name` exists with our size and SHA-256: the one we recorded at upload, and the server's
        own checksum where it keeps one."""
        head = self._retrying(self.where(name), lambda: self._client().head_object(
            Bucket=self.bucket, Key=self._key(name), ChecksumMode="ENABLED"), missing_ok=True)
        if head is None or int(head["ContentLength"]) != size:
            return False
        if head.get("Metadata", {}).get("sha256") != full_hex:
            return False
        stored = head.get("ChecksumSHA256")
        return not stored or stored == _expected_checksum(stored, full_hex, part_digests)

    def delete(self, name):
        self._retrying(self.where(name), lambda: self._client().delete_object(Bucket=self.bucket,
                                                                              Key=self._key(name)))

    def staging_dir(self):
        """One local directory per output URL, shared by all processes of a run and by a rerun (so a
        rerun finds, and replaces, the half-written shards a killed run left). $SHARDGEN_STAGING_DIR,
        else the system temp dir. close() removes it once empty."""
        path = self._staging_path()
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)  # its name is predictable: in a shared /tmp another user may have made it first
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise self._error(f"{path}: the staging folder for {self.url} is a link or another user's folder, "
                              f"so shards built there could be changed before upload: remove it, or set "
                              f"SHARDGEN_STAGING_DIR to a folder of your own")
        return path

    def _staging_path(self) -> str:
        base = os.environ.get("SHARDGEN_STAGING_DIR") or tempfile.gettempdir()
        return os.path.join(base, "shardgen-staging-" + hashlib.sha256(self.url.encode()).hexdigest()[:16])

    def close(self):
        for dirpath, _, _ in sorted(os.walk(self._staging_path()), reverse=True):  # deepest first; only empty folders go
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


# --- clients: one per process and configuration, shared by every S3Storage (creating one costs
# ~50 ms, and shardgen opens a storage per input file)
_CLIENTS: dict[tuple, tuple] = {}
_CLIENTS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _CLIENTS_LOCK
    _CLIENTS_LOCK = threading.Lock()  # a thread of the parent may have held it at fork time
    _CLIENTS.clear()  # the parent's clients share its sockets: never use them here


os.register_at_fork(after_in_child=_after_fork_in_child)


def _shared_client(settings: S3Settings):
    """(client, secrets to redact, credential source, [HTTP requests sent]) for this process, these
    settings and the current AWS_* environment (a changed environment gets a new client)."""
    env = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))).encode())
    key = (os.getpid(), repr(settings), env.hexdigest())
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = _make_client(settings)
        return _CLIENTS[key]


def _make_client(s: S3Settings):
    import boto3
    import botocore.session
    from botocore.config import Config

    core = botocore.session.get_session()
    session = boto3.session.Session(botocore_session=core)
    scoped = core.get_scoped_config()
    retries = {"mode": os.environ.get("AWS_RETRY_MODE") or scoped.get("retry_mode") or "standard",
               "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or scoped.get("max_attempts") or 5)}

    def build(addressing):
        cfg = Config(connect_timeout=s.connect_timeout, read_timeout=s.read_timeout, retries=retries,
                     max_pool_connections=s.max_pool_connections,
                     s3={"addressing_style": addressing} if addressing else None)
        return session.client("s3", region_name=session.region_name or DEFAULT_REGION, config=cfg)

    client = build(None if s.addressing == "auto" else s.addressing)
    if s.addressing == "auto" and not _is_aws_endpoint(client.meta.endpoint_url):
        client = build("path")
    requests = [0]

    def count(**_):
        requests[0] += 1  # under the GIL; an approximate count is all a benchmark needs
    client.meta.events.register("before-send.s3", count)
    secrets, source = [], "unknown"
    creds = session.get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        secrets = [x for x in (frozen.secret_key, frozen.token, frozen.access_key) if x]
        source = getattr(creds, "method", "unknown")
    return client, secrets, source, requests


# --- helpers (no state)
def _is_aws_endpoint(url: str | None) -> bool:
    host = urlparse(url or "").hostname or ""
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def _error_code(e: Exception) -> tuple[str | None, int | None]:
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return None, None
    return resp.get("Error", {}).get("Code"), resp.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _is_missing_key(e: Exception) -> bool:
    code, status = _error_code(e)
    return code in _MISSING_KEY_CODES or (status == 404 and code != "NoSuchBucket")


def _is_transient(e: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error
    if isinstance(e, (_Transient, BotoConnectionError, IncompleteReadError, ResponseStreamingError, Urllib3Error,
                      ConnectionError, TimeoutError)):
        return True
    code, status = _error_code(e)
    return code in _THROTTLE_CODES or (status is not None and status >= 500)


def _read_body(response, want: int) -> bytes:
    data = response["Body"].read()
    if len(data) != want:  # a body cut short: the connection dropped mid-transfer
        raise _Transient(f"got {len(data)} of {want} bytes")
    return data


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/20971520"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def _sha256_file(path: str, part_bytes: int) -> tuple[str, list[bytes]]:
    """Full-file SHA-256 (hex) and the SHA-256 of each multipart part, in one pass."""
    full, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        while True:
            part, left = hashlib.sha256(), part_bytes
            while left:
                chunk = f.read(min(_HASH_CHUNK, left))
                if not chunk:
                    break
                full.update(chunk)
                part.update(chunk)
                left -= len(chunk)
            if left == part_bytes:
                break
            parts.append(part.digest())
            if left:
                break
    return full.hexdigest(), parts


def _expected_checksum(stored: str, full_hex: str, part_digests: list[bytes]) -> str:
    """The checksum the server should report: full-object base64, or composite `<b64 of sha(parts)>-N`."""
    if "-" in stored:
        return base64.b64encode(hashlib.sha256(b"".join(part_digests)).digest()).decode() + f"-{len(part_digests)}"
    return base64.b64encode(bytes.fromhex(full_hex)).decode()
