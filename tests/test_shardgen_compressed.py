"""Pieces of compressed inputs: every line is read by exactly one piece, in order, whatever the cut;
damage is reported once; a build of split .jsonl.gz/.zst files is the same bytes for any --workers."""
import gzip
import io
import os

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgen.build import run_build
from shardgen.compressed import DAMAGE, piece_lines
from shardgen.inputs import GRAIN, InputFile, pieces_of
from tests.shardgen_testlib import (build_options, check_round_trip, expected_stream, make_docs, task_records,
                                    tiny_tokenizer, tree_bytes, write_jsonl)

__all__ = ["tiny_tokenizer"]


def compress(data: bytes, kind: str, members: int) -> bytes:
    """`data` as `members` concatenated gzip members or zstd frames (cut anywhere, even inside a line)."""
    cuts = [len(data) * i // members for i in range(members + 1)]
    parts = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    if kind == ".jsonl.gz":
        return b"".join(gzip.compress(p, mtime=0) for p in parts)
    return b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(p) for p in parts)


def lines_by_piece(blob: bytes, kind: str, grain: int, per_piece: int) -> list[list[tuple[int, bytes]]]:
    size = per_piece * grain
    return [list(piece_lines(io.BytesIO(blob), kind, s, min(s + size, len(blob)), len(blob), grain))
            for s in range(0, len(blob), size)]


LINES = st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=60)


@settings(max_examples=200, deadline=None)
@given(lines=LINES, kind=st.sampled_from([".jsonl.gz", ".jsonl.zst"]), members=st.integers(1, 4),
       grain=st.integers(1, 64), per_piece=st.integers(1, 4), last_newline=st.booleans())
def test_every_line_is_read_by_one_piece_in_order(lines, kind, members, grain, per_piece, last_newline):
    data = b"\n".join(lines) + (b"\n" if last_newline and lines else b"")
    blob = compress(data, kind, members)
    got = [x for piece in lines_by_piece(blob, kind, grain, per_piece) for x in piece]
    parts = data.split(b"\n")
    assert [line for _, line in got] == [x + b"\n" for x in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    assert [n for n, _ in got] == list(range(1, len(got) + 1))  # the line numbers of the whole file


@pytest.mark.parametrize("kind", [".jsonl.gz", ".jsonl.zst"])
def test_damage_is_reported_by_the_one_piece_that_holds_it(kind):
    data = b"".join(b"line %d ........................................\n" % i for i in range(400))
    blob = compress(data, kind, 2)
    truncated, overwritten = blob[:len(blob) * 2 // 3], blob[:len(blob) // 3] + b"\x55" * 50 + blob[len(blob) // 3 + 50:]
    for damaged in (truncated, overwritten):
        reports, lines = 0, []
        for s in range(0, len(damaged), 64):
            try:
                lines += [x for _, x in piece_lines(io.BytesIO(damaged), kind, s, min(s + 64, len(damaged)),
                                                                len(damaged), 32)]
            except DAMAGE:
                reports += 1
        assert reports == 1
        assert damaged is overwritten or data.startswith(b"".join(lines))  # overwritten bytes may decode to garbage


def test_large_compressed_inputs_are_split_into_tasks(tmp_path, tiny_tokenizer):
    docs = make_docs(3000, seed=5)
    os.makedirs(tmp_path / "in")
    paths = [write_jsonl(str(tmp_path / "in" / f"a{kind}"), docs[i::2]) for i, kind in enumerate([".jsonl.gz",
                                                                                                ".jsonl.zst"])]
    sizes = [os.path.getsize(p) for p in paths]
    assert min(sizes) > 2 * GRAIN  # several pieces each
    pieces = [pieces_of(InputFile(p, s, p[p.index(".jsonl"):]), GRAIN) for p, s in zip(paths, sizes)]
    assert all(len(ps) >= 3 for ps in pieces)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        res = run_build(build_options([str(tmp_path / "in")], out, tiny_tokenizer, task_bytes=GRAIN, workers=workers,
                                      seq_len=64))
        assert res.tasks == sum(map(len, pieces))
        outs.append(tree_bytes(str(out)))
    assert outs[0] == outs[1]
    check_round_trip(str(tmp_path / "out1"), expected_stream(tiny_tokenizer, docs[0::2] + docs[1::2]))
    assert sum(r["stats"]["documents"] for r in task_records(str(tmp_path / "out1"))) == len(docs)
