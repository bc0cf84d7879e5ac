"""shardgen build: round trip for every input format, byte-identical output whatever the workers
or nodes, crash and rerun, settings fingerprint."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from shardgen.build import node_from_env, run_build
from shards.format import FormatError, read_manifest
from shardgen.merge import merge
from shardgen.output import BuildError
from shards.storage import LocalStorage
from tests.shardgen_testlib import (SEQ, build_options,
                                    ROOT_DIR, UNICODE_DOCS, check_round_trip, encoder, expected_stream, make_docs,
                                    read_dataset, task_records, tiny_tokenizer, tree_bytes, write_jsonl, write_parquet,
                                    write_txt)

__all__ = ["tiny_tokenizer"]
opts = build_options


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every input format, in a directory whose sorted file order is the document order."""
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(60) + UNICODE_DOCS
    parts = [docs[0:10], docs[10:30], docs[30:40], docs[40:50], docs[50:]]
    write_txt(str(d / "a_txt"), parts[0])
    write_jsonl(str(d / "b.jsonl"), parts[1])
    write_jsonl(str(d / "c.jsonl.gz"), parts[2])
    write_jsonl(str(d / "d.jsonl.zst"), parts[3])
    write_parquet(str(d / "e.parquet"), parts[4], row_group_size=4)
    return d, docs


def test_round_trip_every_format(tmp_path, corpus, tiny_tokenizer):
    d, docs = corpus
    res = run_build(opts([str(d)], tmp_path / "out", tiny_tokenizer))
    assert res.tasks > 3  # the plan cut the corpus into several tasks (jsonl byte ranges, row groups)
    assert any(p["kind"] == ".jsonl" and p["start"] > 0 for r in task_records(str(tmp_path / "out"))
               for p in r["pieces"])
    check_round_trip(str(tmp_path / "out"), expected_stream(tiny_tokenizer, docs))
    m, _ = read_dataset(str(tmp_path / "out"))
    assert m.stats["documents"] == len(docs) and m.stats["input_files"] == 14
    assert m.dtype == "uint16" and m.eos_id == 0 and m.tokenizer["eos_token"] == "<|endoftext|>"


def test_unicode_documents_decode_back_exactly(tmp_path, tiny_tokenizer):
    docs = UNICODE_DOCS + ["x" * 3000]  # the last is far longer than a sequence and a block
    write_jsonl(str(tmp_path / "u.jsonl"), docs)
    run_build(opts([str(tmp_path / "u.jsonl")], tmp_path / "out", tiny_tokenizer, task_bytes=1 << 20))
    _, streams = read_dataset(str(tmp_path / "out"))
    stream = [t for s in streams.values() for t in s]
    pieces = np.split(np.array(stream), np.flatnonzero(np.array(stream) == 0) + 1)
    tok = encoder(tiny_tokenizer)
    decoded = [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces if len(p) and p[-1] == 0]
    assert decoded == docs[:len(decoded)] and len(decoded) >= len(docs) - 1
    assert stream.count(0) == len(decoded)  # "<|endoftext|>" inside a document is text, not a separator


def test_same_bytes_for_1_and_2_workers_and_no_paths(tmp_path, corpus, tiny_tokenizer):
    d, _ = corpus
    run_build(opts([str(d)], tmp_path / "w1", tiny_tokenizer, workers=1))
    run_build(opts([str(d)], tmp_path / "w2", tiny_tokenizer, workers=2))
    a, b = tree_bytes(str(tmp_path / "w1")), tree_bytes(str(tmp_path / "w2"))
    assert sorted(a) == sorted(b) and a == b
    assert str(tmp_path).encode() not in a["manifest.json"]  # no output path in the manifest
    assert b"workers" not in a["manifest.json"]
    assert os.stat(tmp_path / "w1" / "manifest.json").st_mode & 0o777 == 0o644  # readable by other users


def test_two_nodes_then_merge_equals_one_node(tmp_path, corpus, tiny_tokenizer):
    d, _ = corpus
    run_build(opts([str(d)], tmp_path / "one", tiny_tokenizer))
    out = tmp_path / "two"
    r0 = run_build(opts([str(d)], out, tiny_tokenizer, node_rank=0, num_nodes=2))
    assert r0.manifest is None and not (out / "manifest.json").exists()
    assert all(t % 2 == 0 for t in r0.ran)
    with pytest.raises(BuildError, match=r"tasks 1, 3.*node t % n"):
        merge(LocalStorage(str(out)))
    r1 = run_build(opts([str(d)], out, tiny_tokenizer, node_rank=1, num_nodes=2, workers=2))
    assert all(t % 2 == 1 for t in r1.ran)
    merge(LocalStorage(str(out)))
    assert tree_bytes(str(out)) == tree_bytes(str(tmp_path / "one"))


def test_node_rank_from_environment():
    assert node_from_env({}) == (0, 1)
    assert node_from_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (3, 4)
    assert node_from_env({"GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}) == (1, 2)
    assert node_from_env({"NODE_RANK": "2", "NNODES": "5"}) == (2, 5)
    with pytest.raises(BuildError, match="--num-nodes"):
        node_from_env({"NODE_RANK": "2"})


def test_node_flags_override_the_environment_one_by_one(monkeypatch, tmp_path):
    # Each flag replaces only its own variable: `--num-nodes 4` under SLURM keeps SLURM_PROCID (it
    # made every node rank 0), and the `pass --num-nodes` advice works.
    import shardgen.build
    from shardgen.cli import main
    seen = []
    monkeypatch.setattr(shardgen.build, "run_build", lambda opts: seen.append((opts.node_rank, opts.num_nodes)))
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "NODE_RANK", "NNODES", "NUM_NODES", "GROUP_RANK",
                "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    args = ["in.jsonl", "--output", str(tmp_path / "o"), "--tokenizer", "tok"]
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert main(args + ["--num-nodes", "4"]) == 0 and main(args + ["--node-rank", "1"]) == 0
    monkeypatch.delenv("SLURM_NTASKS")
    assert main(args + ["--num-nodes", "4"]) == 0
    monkeypatch.delenv("SLURM_PROCID")
    assert main(args + ["--num-nodes", "4"]) == 0 and main(args) == 0
    assert seen == [(2, 4), (1, 3), (2, 4), (0, 4), (0, 1)]


def test_shard_size_limit_rolls_shards(tmp_path, corpus, tiny_tokenizer):
    d, docs = corpus
    run_build(opts([str(d)], tmp_path / "out", tiny_tokenizer, task_bytes=1 << 20, shard_bytes=2000))
    m, _ = read_dataset(str(tmp_path / "out"))
    names = [s.name for s in m.shards]
    assert names[:3] == ["00000-000.tar", "00000-001.tar", "00000-002.tar"] and len(names) > 3
    check_round_trip(str(tmp_path / "out"), expected_stream(tiny_tokenizer, docs))


def test_add_bos_and_explicit_eos(tmp_path, tiny_tokenizer):
    docs = make_docs(12, seed=3)
    write_jsonl(str(tmp_path / "x.jsonl"), docs)
    tok = encoder(tiny_tokenizer)
    bos = tok.token_to_id("Ġthe")  # any token will do as a BOS for this test
    run_build(opts([str(tmp_path / "x.jsonl")], tmp_path / "out", tiny_tokenizer, add_bos=True,
                   bos_token="Ġthe", eos_token="<|endoftext|>"))
    check_round_trip(str(tmp_path / "out"), expected_stream(tiny_tokenizer, docs, eos=0, bos=bos))
    assert read_dataset(str(tmp_path / "out"))[0].bos_id == bos


def test_uint32_when_the_vocab_needs_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(70000)}
    vocab["</s>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(str(tmp_path / "x.jsonl"), [f"w{i} w69999 w{i * 7}" for i in range(40)])
    run_build(opts([str(tmp_path / "x.jsonl")], tmp_path / "out", str(tmp_path / "tokenizer.json")))
    m, streams = read_dataset(str(tmp_path / "out"))
    assert m.dtype == "uint32" and m.eos_id == 70000
    stream = [t for s in streams.values() for t in s]
    want = [t for i in range(40) for t in (i, 69999, i * 7, 70000)]
    assert stream == want[:len(stream)] and len(want) - len(stream) < SEQ


def test_other_settings_are_refused_unless_overwrite(tmp_path, corpus, tiny_tokenizer):
    d, _ = corpus
    out = tmp_path / "out"
    run_build(opts([str(d)], out, tiny_tokenizer))
    with pytest.raises(BuildError, match=r"seq_len: 16 -> 32.*--overwrite"):
        run_build(opts([str(d)], out, tiny_tokenizer, seq_len=32))
    assert read_manifest(LocalStorage(str(out))).seq_len == 16  # untouched
    run_build(opts([str(d)], out, tiny_tokenizer, seq_len=32, overwrite=True))
    assert read_manifest(LocalStorage(str(out))).seq_len == 32
    again = run_build(opts([str(d)], out, tiny_tokenizer, seq_len=32))  # same settings: nothing to redo
    assert again.ran == [] and again.skipped == again.tasks


def test_shards_of_a_replaced_run_that_finished_nothing_are_removed(tmp_path, corpus, tiny_tokenizer):
    # A run stopped before any task record may have published shards; a run with other settings that
    # replaces it must not leave them beside its own (a plain `*.tar` reader would read them).
    d, _ = corpus
    out = tmp_path / "out"
    run_build(opts([str(d)], out, tiny_tokenizer, seq_len=32))
    for name in os.listdir(out / "_tasks"):
        if name != "settings.json":
            os.unlink(out / "_tasks" / name)
    os.unlink(out / "manifest.json")
    stale = {n for n in os.listdir(out) if n.endswith(".tar")}
    run_build(opts([str(d)], out, tiny_tokenizer, task_bytes=1 << 20))  # other settings, one bigger task
    m = read_manifest(LocalStorage(str(out)))
    assert {n for n in os.listdir(out) if n.endswith(".tar")} == {s.name for s in m.shards}
    assert stale - {s.name for s in m.shards}


def test_task_records_are_read_once_per_build(tmp_path, corpus, tiny_tokenizer, monkeypatch):
    # A record costs a request on S3: the build knows what it wrote, so its merge reads none again,
    # and a rerun reads each once, after one listing (not an existence check per task).
    d, _ = corpus
    calls = []

    def counted(method):
        real = getattr(LocalStorage, method)
        return lambda self, name: calls.append((method, name)) or real(self, name)

    for method in ("exists", "read"):
        monkeypatch.setattr(LocalStorage, method, counted(method))

    def record_calls():
        return sorted((m, n) for m, n in calls if n.startswith("_tasks/0"))

    first = run_build(opts([str(d)], tmp_path / "out", tiny_tokenizer))
    assert first.tasks > 1 and record_calls() == []
    calls.clear()
    run_build(opts([str(d)], tmp_path / "out", tiny_tokenizer))
    assert record_calls() == [("read", f"_tasks/{t:05d}.json") for t in range(first.tasks)]


def start_stalled_build(d, out, tok, marker, task: int) -> subprocess.Popen:
    """shardgen with 2 workers in its own process group; the worker that runs `task` writes its pid to
    `marker` and stalls (tests/fault_shardgen.py). Returns once the marker exists."""
    args = [sys.executable, os.path.join(ROOT_DIR, "tests", "fault_shardgen.py"), str(d), "--output", str(out), "--tokenizer", tok,
            "--seq-len", str(SEQ), "--block-bytes", "128", "--task-bytes", "1500", "--workers", "2", "-q"]
    env = dict(os.environ, STALL_TASK=str(task), STALL_MARKER=str(marker))
    proc = subprocess.Popen(args, env=env, cwd=ROOT_DIR, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the stalled worker never reported"
            time.sleep(0.05)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_tasks(tmp_path, corpus, tiny_tokenizer):
    d, _ = corpus
    run_build(opts([str(d)], tmp_path / "ref", tiny_tokenizer))
    out = tmp_path / "out"
    proc = start_stalled_build(d, out, tiny_tokenizer, tmp_path / "stalled", task=2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: main process and workers
    proc.wait()
    proc.stderr.close()
    assert not (out / "manifest.json").exists()
    assert [f for f in os.listdir(out / "_tmp") if f.startswith("00002-")]  # a half-written shard
    with pytest.raises(FormatError, match="not a shardgen dataset"):
        read_manifest(LocalStorage(str(out)))
    finished = {r["task"]: os.stat(out / "_tasks" / f"{r['task']:05d}.json") for r in task_records(str(out))}
    assert 2 not in finished

    res = run_build(opts([str(d)], out, tiny_tokenizer, workers=2))
    assert res.skipped == len(finished) and not set(res.ran) & set(finished) and 2 in res.ran
    for t, st in finished.items():  # finished records were not rewritten
        now = os.stat(out / "_tasks" / f"{t:05d}.json")
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not (out / "_tmp").exists()
    assert tree_bytes(str(out)) == tree_bytes(str(tmp_path / "ref"))


@pytest.mark.slow
def test_a_killed_worker_is_an_error_naming_its_task_not_a_hang(tmp_path, corpus, tiny_tokenizer):
    d, _ = corpus
    out, marker = tmp_path / "out", tmp_path / "stalled"
    proc = start_stalled_build(d, out, tiny_tokenizer, marker, task=1)
    try:
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)  # one worker only, as the OOM killer would
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1
    assert f"worker process {pid} was killed by SIGKILL (out of memory?) while running task 1" in err.decode()
    res = run_build(opts([str(d)], out, tiny_tokenizer, workers=2))
    assert 1 in res.ran and not (out / "_tmp").exists()
    check_round_trip(str(out), expected_stream(tiny_tokenizer, corpus[1]))


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_main_process_stops_its_workers_and_a_rerun_works_at_once(tmp_path, corpus, tiny_tokenizer,
                                                                              sig):
    d, docs = corpus
    out, marker = tmp_path / "out", tmp_path / "stalled"
    proc = start_stalled_build(d, out, tiny_tokenizer, marker, task=1)
    worker = int(marker.read_text())
    try:
        os.kill(proc.pid, sig)  # the main process only, as `kill PID` or the OOM killer would
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while not gone(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived the main process"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the run
        except ProcessLookupError:
            pass
    if sig == signal.SIGTERM:  # stopped as Ctrl-C stops it
        assert proc.returncode == 128 + signal.SIGTERM, err.decode()
        assert "terminated (SIGTERM); rerun the same command to resume" in err.decode()
    res = run_build(opts([str(d)], out, tiny_tokenizer, workers=2))
    assert 1 in res.ran
    check_round_trip(str(out), expected_stream(tiny_tokenizer, docs))


def test_stale_temp_files_are_removed_on_rerun(tmp_path, corpus, tiny_tokenizer):
    d, _ = corpus
    out = tmp_path / "out"
    run_build(opts([str(d)], out, tiny_tokenizer))
    before = tree_bytes(str(out))
    os.unlink(out / "_tasks" / "00003.json")  # task 3 "was killed" while writing its record and a shard
    (out / "_tasks" / ".00003.json.x1y2.tmp").write_bytes(b'{"task": 3, "half')
    (out / "_tmp").mkdir()
    (out / "_tmp" / "00003-000.tar.tmp").write_bytes(b"half a shard")
    (out / ".manifest.json.z9.tmp").write_bytes(b"{")
    res = run_build(opts([str(d)], out, tiny_tokenizer))
    assert res.ran == [3]
    assert tree_bytes(str(out)) == before


def test_an_unexpected_worker_error_keeps_its_task_and_traceback(tmp_path, corpus, tiny_tokenizer):
    d, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "_tmp").write_bytes(b"")  # a file where the staging folder goes: os.makedirs fails in the worker
    with pytest.raises(FileExistsError) as e:
        run_build(build_options([str(d)], out, tiny_tokenizer))
    assert "task 0 failed in worker process" in str(e.value.__cause__)
    assert "makedirs" in str(e.value.__cause__)  # the worker's traceback


@pytest.mark.slow
def test_a_second_run_into_the_same_output_is_refused_naming_the_first(tmp_path, corpus, tiny_tokenizer):
    d, docs = corpus
    out = tmp_path / "out"
    proc = start_stalled_build(d, out, tiny_tokenizer, tmp_path / "stalled", task=1)
    try:
        with pytest.raises(BuildError, match=rf"another shardgen run is writing to it \(pid {proc.pid} on "):
            run_build(opts([str(d)], out, tiny_tokenizer, workers=2))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    run_build(opts([str(d)], out, tiny_tokenizer, workers=2))  # the kernel dropped the dead run's lock
    check_round_trip(str(out), expected_stream(tiny_tokenizer, docs))
    assert not (out / ".shardgen.lock").exists()


def unwritable_dir(tmp_path) -> str:
    """A directory this process cannot create files in (root ignores modes: /sys refuses it too)."""
    if os.geteuid() == 0:
        return "/sys/shardgen-test-output"
    d = tmp_path / "readonly"
    d.mkdir(mode=0o555)
    return str(d / "out")


def test_an_output_that_is_a_file_or_not_writable_is_one_error_line(tmp_path, corpus, tiny_tokenizer, capsys):
    from shardgen.cli import main
    d, _ = corpus
    (tmp_path / "file").write_text("not a directory")
    for out, want in ((tmp_path / "file", "is a file, not a directory: choose another --output"),
                      (unwritable_dir(tmp_path), "cannot write there (")):
        assert main([str(d), "--output", str(out), "--tokenizer", tiny_tokenizer, "-q"]) == 1
        err = capsys.readouterr().err
        assert want in err and f"--output {out}" in err and len(err.strip().splitlines()) == 1, err


def test_relative_and_absolute_inputs_are_the_same_build(tmp_path, tiny_tokenizer, monkeypatch):
    write_jsonl(str(tmp_path / "in.jsonl"), make_docs(30))
    monkeypatch.chdir(tmp_path)
    first = run_build(opts(["in.jsonl"], tmp_path / "out", tiny_tokenizer))
    before = tree_bytes(str(tmp_path / "out"))
    again = run_build(opts([str(tmp_path / "in.jsonl")], tmp_path / "out", tiny_tokenizer))  # was refused
    assert first.ran and again.ran == [] and again.skipped == first.tasks
    assert tree_bytes(str(tmp_path / "out")) == before
    (tmp_path / "other").mkdir()
    os.rename(tmp_path / "in.jsonl", tmp_path / "other" / "in.jsonl")  # another file: other settings
    with pytest.raises(BuildError, match=r"inputs: \['in.jsonl'\] -> \[.*other/in.jsonl'\]"):
        run_build(opts([str(tmp_path / "other" / "in.jsonl")], tmp_path / "out", tiny_tokenizer))
