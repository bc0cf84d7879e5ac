"""Input listing and the fixed task plan.

INPUT arguments (files, directories, globs; local paths or s3:// URLs) become a sorted list of
input files, listed through the Storage interface. The files are cut into *pieces* (a whole file,
a newline-aligned byte range of a large uncompressed .jsonl, a range of compressed bytes of a large
.jsonl.gz/.zst whose lines are the ones that start in its output, or a run of parquet row groups) and
consecutive pieces are grouped into *tasks* of about `task_bytes` input bytes. The plan depends
only on the inputs and `task_bytes`, never on the number of workers or nodes: that is what makes
the output byte-identical whatever the parallelism.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import os
from dataclasses import asdict, dataclass

from shards.errors import UserError
from shards.format import canonical_json
from shards.rangefile import RangeFile
from shards.storage import Storage, StorageError, is_s3
from shards.backends import open_storage

KINDS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".txt", ".parquet")  # longest suffix first
SPLITTABLE = ".jsonl"  # cut at byte offsets, at line boundaries
COMPRESSED = (".jsonl.gz", ".jsonl.zst")  # cut at compressed offsets: see shardgen/compressed.py
GRAIN = 64 << 10  # compressed bytes decompressed at a time; pieces of compressed files start at multiples of it
MAX_COMPRESSED_PIECES = 16  # each piece decompresses its file from the start: at most 8.5x the file in all
READ_BUFFER = 4 << 20


class InputError(UserError):
    """Unreadable or malformed input. The message names the file (and line) and the flag that skips it."""


def kind_of(name: str) -> str | None:
    return next((k for k in KINDS if name.endswith(k)), None)


@dataclass(frozen=True)
class InputFile:
    url: str
    size: int
    kind: str


@dataclass(frozen=True)
class Piece:
    """A part of one input file: bytes [start, end) for .jsonl, .jsonl.gz and .jsonl.zst (compressed
    bytes for these), row groups [start, end) for parquet (end -1: all of them), the whole file otherwise. `nbytes` is its input size, for progress."""
    url: str
    kind: str
    start: int
    end: int
    nbytes: int


@dataclass(frozen=True)
class Task:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def to_json(self) -> list:
        return [asdict(p) for p in self.pieces]


def split_url(url: str) -> tuple[Storage, str]:
    """The storage holding `url`'s parent directory, and the file's name in it."""
    parent, _, name = url.rstrip("/").rpartition("/")
    if not is_s3(url):
        parent, name = os.path.split(url)
    return open_storage(parent or "."), name


def open_input(url: str) -> tuple[io.BufferedReader, int]:
    """A buffered, seekable reader of `url` and its size; InputError if it cannot be opened."""
    storage, name = split_url(url)
    try:
        size = storage.size(name)
        raw = RangeFile(storage, name, size, close_storage=True)
        if size:
            storage.read_range(name, 0, 1)  # fail here, with the file's name, if it is unreadable
    except (StorageError, OSError) as e:
        storage.close()
        raise InputError(f"{url}: cannot read ({getattr(e, 'strerror', None) or e}); fix its permissions or "
                         f"remove it from the inputs") from None
    return io.BufferedReader(raw, READ_BUFFER), size


def _has_magic(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _glob_match(url: str, spec: str) -> bool:
    """glob.glob's rules (recursive=True) on a '/'-separated URL, so a glob picks the same files on S3
    as on disk: * ? [...] within one path segment, ** any number of segments, and a wildcard matches
    no hidden name (one starting with '.')."""
    def match(names: list[str], pats: list[str]) -> bool:
        if not pats:
            return not names
        if pats[0] == "**":
            return any(match(names[i:], pats[1:]) for i in range(len(names) + 1)
                       if not any(n.startswith(".") for n in names[:i]))
        if not names or names[0].startswith(".") and _has_magic(pats[0]) and not pats[0].startswith("."):
            return False
        return fnmatch.fnmatchcase(names[0], pats[0]) and match(names[1:], pats[1:])
    return match(url.split("/"), spec.split("/"))


def _list_one(spec: str) -> list[tuple[str, int | None]]:
    """(URL, size if the listing gave it) of the input files named by one INPUT argument (a file, a
    directory or a glob). On S3 the sizes come with the listing: no request per file."""
    if _has_magic(spec):
        if is_s3(spec):
            head = spec[:min(spec.index(c) for c in "*?[" if c in spec)]
            root, _, prefix = head.rpartition("/")
            listed = open_storage(root).list_sizes(prefix)
            return [(f"{root}/{n}", size) for n, size in listed if _glob_match(f"{root}/{n}", spec)]
        return [(p, None) for p in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(p)]
    if is_s3(spec):
        storage, name = split_url(spec)
        if not spec.endswith("/") and storage.exists(name):
            return [(spec, None)]
        return [(f"{spec.rstrip('/')}/{n}", size) for n, size in open_storage(spec).list_sizes()]
    if os.path.isdir(spec):
        return [(os.path.join(spec, n), None) for n in open_storage(spec).list()]
    if os.path.exists(spec):
        return [(spec, None)]
    raise InputError(f"{spec}: no such file or directory (inputs are files, directories or globs of "
                     f"{', '.join(KINDS)})")


def _hidden(url: str, spec: str) -> bool:
    rel = url[len(spec):] if url.startswith(spec) else os.path.basename(url)
    return any(part.startswith(".") for part in rel.replace("\\", "/").split("/") if part)


def list_inputs(specs: list[str]) -> tuple[list[InputFile], list[str]]:
    """Input files in argument order (each directory or glob sorted by name), and the ignored names.

    A file named explicitly with an unknown suffix is an error; inside a directory or glob it is
    ignored (and reported); hidden files there are ignored silently. A file named twice is read once.
    """
    files, ignored, seen = [], [], set()
    for spec in specs:
        listed = _list_one(spec)
        explicit = [u for u, _ in listed] == [spec] and not _has_magic(spec)
        if not listed:
            raise InputError(f"{spec}: matches no files")
        for url, size in listed:
            kind = kind_of(url)
            if not explicit and _hidden(url, spec):
                continue  # .stamp files, .git, editor droppings
            if kind is None:
                if explicit:
                    raise InputError(f"{url}: unknown input type; inputs end in {', '.join(KINDS)}")
                ignored.append(url)
                continue
            if url in seen:
                continue
            seen.add(url)
            if size is None:
                storage, name = split_url(url)
                size = storage.size(name)
            files.append(InputFile(url=url, size=size, kind=kind))
    if not files:
        raise InputError(f"{' '.join(specs)}: no input files ({', '.join(KINDS)}) found")
    return files, ignored


def _parquet_groups(f: InputFile, task_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq
    try:
        with open_input(f.url)[0] as reader:
            meta = pq.ParquetFile(reader).metadata
    except Exception:  # noqa: BLE001 - a damaged file is reported, with its name, when its task reads it
        return [Piece(f.url, f.kind, 0, -1, f.size)]
    pieces, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        acc += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        if acc >= task_bytes or g == meta.num_row_groups - 1:
            pieces.append(Piece(f.url, f.kind, start, g + 1, acc))
            start, acc = g + 1, 0
    return pieces or [Piece(f.url, f.kind, 0, 0, f.size)]


def pieces_of(f: InputFile, task_bytes: int) -> list[Piece]:
    if f.kind == SPLITTABLE and f.size > task_bytes:
        return [Piece(f.url, f.kind, s, min(s + task_bytes, f.size), min(task_bytes, f.size - s))
                for s in range(0, f.size, task_bytes)]
    if f.kind == ".parquet":
        return _parquet_groups(f, task_bytes)
    if f.kind in COMPRESSED and f.size > max(task_bytes, GRAIN):
        n = min(-(-f.size // task_bytes), MAX_COMPRESSED_PIECES)  # pieces of equal size, about task_bytes
        size = -(-f.size // n // GRAIN) * GRAIN
        return [Piece(f.url, f.kind, s, min(s + size, f.size), min(size, f.size - s)) for s in range(0, f.size, size)]
    return [Piece(f.url, f.kind, 0, f.size, f.size)]


def plan_tasks(files: list[InputFile], task_bytes: int) -> list[Task]:
    """Consecutive pieces grouped into tasks of at most `task_bytes` (a bigger piece is a task alone)."""
    tasks, group, acc = [], [], 0
    for f in files:
        for p in pieces_of(f, task_bytes):
            if group and acc + p.nbytes > task_bytes:
                tasks.append(Task(len(tasks), tuple(group)))
                group, acc = [], 0
            group.append(p)
            acc += p.nbytes
    if group:
        tasks.append(Task(len(tasks), tuple(group)))
    return tasks


def plan_hash(tasks: list[Task]) -> str:
    return hashlib.sha256(canonical_json([t.to_json() for t in tasks], ascii_only=True, newline=False)).hexdigest()
