"""Shared by the trainer/model/export tests: tiny shards (with a real tokenizer), tiny model JSONs, env."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from trainer.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
VOCAB = 320


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (children first level, then theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL a process and all its descendants at once, as a lost machine would, and wait until they
    are gone. torchrun starts its workers in process sessions of their own, so killing torchrun's
    process group leaves the workers running (and writing to the run directory)."""
    tree = [pid] + descendants(pid)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    for p in tree:
        while time.time() < deadline:
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break  # dead, waiting for its parent to reap it
            except OSError:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"process {p} still running {timeout}s after SIGKILL")


def kill_after_steps(cmd: list[str], tmp: str, out_dir: str, steps: int, timeout: float = 300.0) -> None:
    """Start a training command and SIGKILL it (and any workers: kill_tree) once `steps` steps are logged
    in OUT/metrics.jsonl. Fails if the run ends on its own first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_steps(proc, out_dir, steps, time.time() + timeout)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        kill_tree(proc.pid)
        proc.wait()


def _wait_for_steps(proc: subprocess.Popen, out_dir: str, steps: int, deadline: float) -> None:
    """Until `steps` steps are logged in OUT/metrics.jsonl, the process ends, or the deadline."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= steps:
            return
        time.sleep(0.05)


def signal_after_steps(cmd: list[str], tmp: str, out_dir: str, steps: int, signum: int, target=None,
                       timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Start a training command, send `signum` once `steps` steps are logged in OUT/metrics.jsonl (to the command,
    or to the pids `target(proc)` returns), and wait for it to end. Fails if the run ends on its own first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        _wait_for_steps(proc, out_dir, steps, deadline)
        assert proc.poll() is None, "the run ended before the signal"
        for pid in (target(proc) if target else [proc.pid]):
            os.kill(pid, signum)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def tokenizer_json(path: str, vocab_size: int = VOCAB, text: list[str] | None = None) -> int:
    """A byte-level BPE trained on a few lines (or `text`); returns its vocab size (<= vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = text or ["to be or not to be that is the question", "whether tis nobler in the mind to suffer"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(path)
    return tok.get_vocab_size()


def make_shards(root: str, *, sequences: int = 64, seq_len: int = 32, seed: int = 0, rows_per_block: int = 4,
                shards: int = 2, vocab: int = VOCAB) -> str:
    """A learnable dataset: each document follows t[i+1] = (5 * t[i] + 1) mod V, ended by EOS (id 0)."""
    from shards.format import MANIFEST_NAME, Manifest, ShardWriter, index_name
    from shards.storage import LocalStorage
    os.makedirs(root, exist_ok=True)
    tok_path = os.path.join(root, "tokenizer.json")
    vocab_size = tokenizer_json(tok_path, vocab)
    rng = np.random.default_rng(seed)
    stream = []
    while len(stream) < sequences * seq_len:
        t = int(rng.integers(1, vocab_size))
        for _ in range(int(rng.integers(8, 40))):
            stream.append(t)
            t = (5 * t + 1) % vocab_size or 1
        stream.append(0)
    data = np.array(stream[:sequences * seq_len], dtype=np.uint16).reshape(sequences, seq_len)
    infos, per_shard = [], sequences // shards
    for s in range(shards):
        name = f"{s:05d}.tar"
        with open(os.path.join(root, name), "wb") as f:
            w = ShardWriter(f, name, seq_len, "uint16")
            part = data[s * per_shard:(s + 1) * per_shard]
            for b in range(0, len(part), rows_per_block):
                w.add_block(part[b:b + rows_per_block], eos_id=0)
            infos.append(w.close())
        with open(os.path.join(root, index_name(name)), "wb") as f:
            f.write(w.index_bytes)
    import hashlib
    m = Manifest(seq_len=seq_len, dtype="uint16", eos_id=0, bos_id=None,
                 tokenizer={"source": tok_path, "sha256": hashlib.sha256(open(tok_path, "rb").read()).hexdigest(),
                            "vocab_size": vocab_size}, shards=infos)
    LocalStorage(root).put_bytes(MANIFEST_NAME, m.to_bytes())
    return root


def tiny_model_json(path: str, model_type: str = "gla", **extra) -> str:
    base = {"model_type": model_type, "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 1,
            "vocab_size": VOCAB, "fuse_cross_entropy": True, "tie_word_embeddings": False}
    if model_type == "gla":
        base.update(expand_k=0.5, expand_v=1, attn_mode="chunk")
    base.update(extra)
    with open(path, "w") as f:
        json.dump(base, f)
    return path


def env(tmp: str) -> dict:
    e = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
             TRITON_CACHE_DIR=os.path.join(tmp, "triton-cache"), TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def write_toml(path: str, sections: dict) -> str:
    lines = []
    for sec, table in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_trainer(tmp: str, config: str, *overrides: str, nproc: int = 1, timeout: int = 600, check: bool = True):
    if nproc == 1:
        cmd = [PY, "-m", "trainer", config, *overrides]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "trainer",
               config, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env(tmp), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"trainer failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir)]


def final_weights(out_dir):
    from trainer.export import load_checkpoint_model
    model, _, path = load_checkpoint_model(out_dir)
    return model.state_dict(), path
