"""The Makefile's `shards` target: what it derives from INPUT / OUTPUT / TOKENIZER, read from `make -n` (the commands
it would run, none run). A new user's trial found a glob INPUT writing `data/shards/*.jsonl.zst/`, a trailing slash
writing into `data/shards/` itself, and a mistyped TOKENIZER= trained into instead of reported."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_n(*assignments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), "shards", *assignments],
                          capture_output=True, text=True, timeout=60)


def shardgen_lines(out: str) -> list[str]:
    return [line for line in out.replace("\\\n", " ").splitlines() if "-m shardgen" in line]


def one(lines: list[str], *parts: str) -> str:
    """The one line holding every part (a tokenizer already trained on this machine is not trained again, so the
    lines are found by what they say, not by their position)."""
    found = [line for line in lines if all(p in line for p in parts)]
    assert len(found) == 1, (parts, lines)
    return found[0]


def test_trailing_slash_names_the_output_after_the_directory():
    r = make_n("INPUT=corpus/txt/")
    assert r.returncode == 0, r.stderr
    lines = shardgen_lines(r.stdout)
    assert "--tokenizer data/tokenizers/txt " in one(lines, "corpus/txt/ --output data/shards/txt ")
    if not (REPO / "data/tokenizers/txt/tokenizer.json").exists():
        one(lines, "train-tokenizer corpus/txt/ --output data/tokenizers/txt ")


@pytest.mark.parametrize("inp", ["corpus/*.jsonl.zst", "corpus/part-?.jsonl", "corpus/[ab].txt", "a.jsonl b.jsonl"])
def test_a_glob_or_several_inputs_without_output_is_refused(inp):
    r = make_n(f"INPUT={inp}")
    assert r.returncode != 0
    assert f"INPUT='{inp}'" in r.stderr and "OUTPUT=" in r.stderr
    assert "-m shardgen" not in r.stdout  # nothing would have run, no tokenizer trained


def test_a_glob_with_output_builds_there():
    r = make_n("INPUT=corpus/*.jsonl.zst", "OUTPUT=data/shards/web", "VAL_INPUT=val/*.jsonl")
    assert r.returncode == 0, r.stderr
    lines = shardgen_lines(r.stdout)
    one(lines, "corpus/*.jsonl.zst --output data/shards/web --tokenizer data/tokenizers/web ")
    one(lines, "val/*.jsonl --output data/shards/web-val --tokenizer data/tokenizers/web ")


def test_a_named_tokenizer_is_used_never_trained_into():
    r = make_n("INPUT=corpus", "OUTPUT=out", "TOKENIZER=/no/such/tokenizer")
    assert r.returncode == 0, r.stderr
    assert "train-tokenizer" not in r.stdout
    one(shardgen_lines(r.stdout), "--tokenizer /no/such/tokenizer ")  # shardgen reports a missing one, naming it


def test_the_demo_corpus_keeps_the_demo_tokenizer_and_validation():
    for inp in ("data/shakespeare", "data/shakespeare/"):
        r = make_n(f"INPUT={inp}")
        assert r.returncode == 0, r.stderr
        lines = shardgen_lines(r.stdout)
        one(lines, f"{inp} --output data/shards/shakespeare --tokenizer data/tokenizer ")
        one(lines, "data/shakespeare-val --output data/shards/shakespeare-val --tokenizer data/tokenizer ")
