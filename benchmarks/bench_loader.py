"""Triplet loader throughput (samples/s) from local disk, tiny and SD-size latents.

Writes synthetic triplet datasets (random float16 ``x1``, X0 not stored, as the SD 1.5 config
writes them) with the real shard writer, then times the trainer's input pipeline for one
process: shuffled global batches, this host's slice read by Grain's threads, prompts tokenized
(the trainer's ``_host_batch``, with the tiny test tokenizer) — everything but the copy to the
device. X0 is not read: the train step draws it on device. Example:

    python benchmarks/bench_loader.py --samples 8192 --batch 64 --batches 60 --threads 4
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import threading
import time

from instaflow_jax.data.loader import ShuffledLoader
from instaflow_jax.data.triplets import TripletDataset
from instaflow_jax.testing import write_synthetic_triplets, write_tiny_tokenizer
from instaflow_jax.text import load_tokenizer
from instaflow_jax.train.trainer import _host_batch

SHAPES = {"tiny": (8, 8, 4), "sd": (64, 64, 4)}  # (h, w, C) NHWC latents


def samples_per_s(loader: ShuffledLoader, batches: int) -> tuple[float, float, float]:
    """(first-batch latency in s, samples/s, CPU seconds per sample of all threads) over
    ``batches`` batches after 3 warm-up ones."""
    start = time.perf_counter()
    iterator = loader.iterator()
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(2):
        next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    samples = loader.local_batch * batches
    return first, samples / (time.perf_counter() - start), (time.process_time() - cpu) / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="host-local batch")
    parser.add_argument("--batches", type=int, default=60, help="timed batches")
    parser.add_argument("--threads", type=int, default=4, help="Grain read threads")
    parser.add_argument("--prefetch", type=int, default=8, help="host batches read ahead")
    parser.add_argument("--no-tokenize", action="store_true", help="time the reads alone")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dir", default="", help="where to write the datasets (default: a temp dir)")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_loader_")
    transform = None
    if not args.no_tokenize:
        write_tiny_tokenizer(os.path.join(root, "tokenizer"))
        tokenizer = load_tokenizer(os.path.join(root, "tokenizer"))
        transform = functools.partial(_host_batch, tokenizer=tokenizer, lock=threading.Lock())
    for name in args.shapes:
        shape = SHAPES[name]
        folder = os.path.join(root, f"{name}_{args.samples}")
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            write_synthetic_triplets(folder, args.samples, args.shard_size, shape, dtype="float16")
        dataset = TripletDataset(folder, regenerate_x0=False)
        loader = ShuffledLoader(
            dataset, args.batch, num_threads=args.threads, prefetch=args.prefetch, transform=transform
        )
        first, rate, cpu = samples_per_s(loader, args.batches)
        print(
            f"{name:5s} latents {shape}: first batch {first:.2f} s, {rate:,.0f} samples/s, "
            f"{cpu * 1e6:.0f} CPU µs/sample "
            f"(batch {args.batch}, {args.threads} threads, prefetch {args.prefetch}, "
            f"{'reads only' if transform is None else 'reads + tokenization'})",
            flush=True,
        )


if __name__ == "__main__":
    main()
