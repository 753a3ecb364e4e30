"""Instance-level against label-level evaluation at RSICD test size (1,093 images x 5,465 captions), same run.

  python -m benchmarks.bench_relevance [--images 1093] [--k 5] [--classes 31] [--repeats 3]

Each protocol runs metrics.retrieval_metrics (i2t and t2i) on the same random similarity matrix in a fresh
child process, which reports its median wall seconds and its peak memory above the loaded matrix (maxrss).
The looped instance reference of tests/references.py runs on a 200-image corner of the matrix for the ratio.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import numpy as np

from metrics import retrieval_metrics
from tests.references import instance_metrics_reference


def case(images: int, k: int, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, images)
    captions = np.repeat(labels, k)
    return rng.random((images, images * k)) + 0.3 * (labels[:, None] == captions[None]), labels, captions


def measure(relevance: str, images: int, k: int, classes: int, repeats: int, out) -> None:
    """Child process: median seconds and peak MiB above the matrix of one protocol."""
    sims, labels, captions = case(images, k, classes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        retrieval_metrics(sims, labels, captions, relevance=relevance)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    out.put((statistics.median(seconds), peak / 1024))


def in_child(*args) -> tuple[float, float]:
    queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=measure, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1093)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--classes", type=int, default=31)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    shape = f"{args.images} images x {args.images * args.k} captions"
    results = {r: in_child(r, args.images, args.k, args.classes, args.repeats) for r in ("label", "instance")}
    print(f"retrieval_metrics, i2t + t2i, {shape} (median of {args.repeats}):")
    for relevance, (seconds, mib) in results.items():
        print(f"  {relevance:8s} {seconds:7.2f} s   peak {mib:7.1f} MiB above the matrix")
    print(f"  instance / label: time {results['instance'][0] / results['label'][0]:.2f}x, "
          f"peak memory {results['instance'][1] / max(results['label'][1], 1e-9):.2f}x")
    sims, _, _ = case(args.images, args.k, args.classes)
    sub = sims[:200, :200 * args.k]
    start = time.perf_counter()
    fast = retrieval_metrics(sub, np.zeros(200), np.zeros(200 * args.k), relevance="instance")
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = instance_metrics_reference(sub, args.k)
    reference_s = time.perf_counter() - start
    print(f"200 x {200 * args.k} instance metrics: looped reference {reference_s:.3f} s, fast {fast_s:.4f} s "
          f"({reference_s / fast_s:.0f}x), |rsum difference| {abs(fast['rsum'] - reference['rsum']):.1e}")


if __name__ == "__main__":
    main()
