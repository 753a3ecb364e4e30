"""Speed and memory of the fast code against the plain references, measured in the same run (CPU).

  python -m benchmarks.benchmark                     everything (about 10-15 minutes on 2 cores)
  python -m benchmarks.benchmark --only loss,map   a subset: loss, map, global_epoch, local_step,
                                            local_scoring, local_memory, local_epoch, features,
                                            gallery (evaluate.py --shortlist 100 on 10k/50k/100k items)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from loss import msb_loss
from metrics import ranking_metrics
from runtime.layout import COARSE_FOLDER, FINE_FOLDER
from tests.references import map_reference, msb_loss_reference

PARTS = ("loss", "map", "global_epoch", "local_step", "local_scoring", "local_memory", "local_epoch", "features",
         "gallery")


def _median_seconds(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def bench_loss(batch_size: int = 100, labels: int = 50) -> dict:
    """MSB forward + backward at B=100, vectorised vs looped over anchors."""
    gen = torch.Generator().manual_seed(0)
    sims = torch.rand(batch_size, batch_size, generator=gen, requires_grad=True)
    y = torch.randint(0, labels, (batch_size,), generator=gen)

    def step(fn):
        sims.grad = None
        fn(sims, y).backward()
    fast = _median_seconds(lambda: step(msb_loss), 20)
    reference = _median_seconds(lambda: step(msb_loss_reference), 3)
    with torch.no_grad():
        same = abs(float(msb_loss(sims.double(), y) - msb_loss_reference(sims.double(), y)))
    return {"fast_s": fast, "reference_s": reference, "ratio": reference / fast, "abs_diff": same}


def bench_map(n: int = 5000, labels: int = 50) -> dict:
    """mAP@all of an n x n matrix (one direction), vectorised vs looped over queries."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, labels, n)
    sims = rng.random((n, n)) + 0.5 * (y[:, None] == y[None, :])
    start = time.perf_counter()
    fast = ranking_metrics(sims, y, y)["mAP"]
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = map_reference(sims, y, y)
    reference_s = time.perf_counter() - start
    return {"n": n, "fast_s": fast_s, "reference_s": reference_s, "ratio": reference_s / fast_s,
            "fast_mAP": fast, "reference_mAP": reference, "abs_diff": abs(fast - reference)}


def bench_epoch(kind: str, items: int = 4493) -> dict:
    """Seconds of one training epoch on generated data at full dimensions (4096/500/300/1024)."""
    from synthetic import generate
    from trainer import Trainer
    from options import parse_options
    from vocab import build_vocab, save_vocab, vocab_file
    with tempfile.TemporaryDirectory() as root:
        generate(root, "bench_precomp", {"train": items, "dev": 100})
        folder = COARSE_FOLDER if kind == "global" else FINE_FOLDER
        save_vocab(build_vocab([f"{root}/{folder}/bench_precomp/train_caps.txt"]), vocab_file(root, "bench_precomp"))
        opt = parse_options(kind, ["--data_path", f"{root}/{folder}", "--data_name", "bench_precomp",
                                   "--vocab_path", root, "--logger_name", f"{root}/run",
                                   "--model_name", f"{root}/run", "--device", "cpu"])
        trainer = Trainer(kind, opt)
        start = time.perf_counter()
        trainer.train_epoch()
        return {"items": items, "seconds_per_epoch": time.perf_counter() - start,
                "threads": torch.get_num_threads()}


def run(part: str) -> dict:
    if part == "loss":
        return bench_loss()
    if part == "map":
        return bench_map()
    if part in ("global_epoch", "local_epoch"):
        return bench_epoch(part.split("_")[0])
    if part == "gallery":
        from benchmarks import bench_gallery
        return bench_gallery.bench_gallery()
    if part.startswith("local_"):
        from benchmarks import bench_local
        return getattr(bench_local, f"bench_{part}")()
    from benchmarks import bench_features
    return bench_features.bench_features()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS))
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for part in args.only.split(","):
        figures = run(part)
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in figures.items() if not isinstance(v, (list, dict)))
        print(f"{part:14s} {shown}", flush=True)


if __name__ == "__main__":
    main()
