"""Throughput and peak memory of `nanogpt-prepare data=documents` against nanoGPT's
data/openwebtext/prepare.py approach (datasets' `map` with `num_proc`, then a memmap written in
1024 shards), on the same local corpus, side by side in one run. Prints figures; asserts nothing.

    python tests/benchmarks/prepare_documents.py                   # 100 MB and 200 MB of text, 2 processes
    python tests/benchmarks/prepare_documents.py --sizes-mb 10 20 --workers 2

The corpus: tiny Shakespeare's lines, shuffled and grouped into documents of 5-80 lines, repeated
(each repeat shuffled anew) up to the size asked, written as one parquet file (row groups of 10,000
documents). Each preparation runs as its own subprocess, from an empty HF datasets cache and data
dir; its peak memory is the largest sum of RSS over its process tree (the process and its workers),
sampled from /proc every 20 ms (Linux), and ru_maxrss (the largest single process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tests/benchmarks/ -> the repo root
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# nanoGPT's data/openwebtext/prepare.py, reading the same parquet file instead of the hub's openwebtext
# (and writing a small split in fewer than 1024 shards, which it cannot otherwise).
NANOGPT_STYLE = r'''
import sys, numpy as np, tiktoken
from datasets import load_dataset
path, out, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
enc = tiktoken.get_encoding("gpt2")
dataset = load_dataset("parquet", data_files=path, num_proc=num_proc)
split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split_dataset["val"] = split_dataset.pop("test")
def process(example):
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {"ids": ids, "len": len(ids)}
tokenized = split_dataset.map(process, remove_columns=["text", "id"], desc="tokenizing the splits", num_proc=num_proc)
total = 0
for split, dset in tokenized.items():
    arr_len = np.sum(dset["len"], dtype=np.uint64)
    arr = np.memmap(f"{out}/{split}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
    idx = 0
    total_batches = min(1024, len(dset))  # nanoGPT's 1024, at most one per document (a small val split)
    for batch_idx in range(total_batches):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    total += int(arr_len)
print("TOKENS", total)
'''


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write the parquet corpus; returns its number of documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = SHAKESPEARE.read_text().split("\n")
    rng = random.Random(seed)
    target, written, docs, n = size_mb * 1e6, 0, [], 0
    writer = None
    while written < target:
        order = lines[:]
        rng.shuffle(order)
        i = 0
        while i < len(order) and written < target:
            k = rng.randrange(5, 80)
            doc = "\n".join(order[i:i + k])
            i += k
            docs.append(doc)
            written += len(doc.encode())
            if len(docs) == 10_000:
                writer = _write(pa, pq, writer, path, docs, n)
                n += len(docs)
                docs = []
    if docs:
        writer = _write(pa, pq, writer, path, docs, n)
        n += len(docs)
    writer.close()
    return n


def _write(pa, pq, writer, path, docs, start):
    table = pa.table({"id": list(range(start, start + len(docs))), "text": docs})
    if writer is None:
        writer = pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
    return writer


def _tree_rss(root: int) -> int:
    """Bytes of RSS of root and all its descendants (/proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def measure(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, float | str]:
    """Run command; its wall time, the peak RSS of its process tree, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall, "peak_tree_mb": peak[0] / 1e6, "stdout": stdout}


def run_ours(corpus: Path, work: Path, workers: int) -> dict:
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = measure([sys.executable, "-m", "nanogpt.prepare", "data=documents", f"data.source={corpus}",
                      f"data.dir={out}", "data.val_fraction=0.0005", f"data.num_threads={workers}"], env, work)
    meta = json.loads((out / "meta.json").read_text())
    result["tokens"] = meta["train_tokens"] + meta["val_tokens"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def run_nanogpt_style(corpus: Path, work: Path, workers: int) -> dict:
    out, cache = work / "nanogpt", work / "hf_cache"
    for d in (out, cache):
        shutil.rmtree(d, ignore_errors=True)
    out.mkdir()
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = measure([sys.executable, "-c", NANOGPT_STYLE, str(corpus), str(out), str(workers)], env, work)
    result["tokens"] = int(result["stdout"].split("TOKENS")[1].split()[0])
    for d in (out, cache):
        shutil.rmtree(d, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 200], help="corpus sizes (MB of text)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of both preparations")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--skip-nanogpt", action="store_true", help="time only nanogpt-prepare")
    args = parser.parse_args(argv)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "tiktoken_cache"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="prepare_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}: {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, workers={args.workers}")
    rows = {}
    for size in args.sizes_mb:
        corpus = work / f"corpus_{size:g}mb.parquet"
        n_docs = make_corpus(corpus, size)
        for name, fn in (("nanogpt-prepare (documents)", run_ours), ("nanoGPT prepare.py style", run_nanogpt_style)):
            if args.skip_nanogpt and fn is run_nanogpt_style:
                continue
            r = fn(corpus, work, args.workers)
            r["tokens_per_s"] = r["tokens"] / r["wall_s"]
            rows[(size, name)] = r
            print(f"{size:>6g} MB {n_docs:>9,} docs  {name:<28} {r['tokens']:>12,} tokens  {r['wall_s']:7.1f} s  "
                  f"{r['tokens_per_s'] / 1e6:6.2f} M tokens/s  peak RSS (tree) {r['peak_tree_mb']:7.0f} MB", flush=True)
        corpus.unlink()
    for size in args.sizes_mb:
        ours, theirs = rows[(size, "nanogpt-prepare (documents)")], rows.get((size, "nanoGPT prepare.py style"))
        if theirs:
            print(f"{size:g} MB: throughput ours / nanoGPT-style = {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
                  f"peak memory ours / nanoGPT-style = {ours['peak_tree_mb'] / theirs['peak_tree_mb']:.2f}x")
    if len(args.sizes_mb) >= 2:
        a, b = args.sizes_mb[0], args.sizes_mb[-1]
        for name in ("nanogpt-prepare (documents)", "nanoGPT prepare.py style"):
            if (a, name) in rows:
                print(f"{name}: peak memory at {b:g} MB / at {a:g} MB = "
                      f"{rows[(b, name)]['peak_tree_mb'] / rows[(a, name)]['peak_tree_mb']:.2f}")
    print(f"ru_maxrss of the largest child process: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3:.0f} MB")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return {f"{size:g}MB {name}": {k: v for k, v in r.items() if k != "stdout"} for (size, name), r in rows.items()}


if __name__ == "__main__":
    main()
