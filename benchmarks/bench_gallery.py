"""Time and peak memory of evaluate.py --shortlist on large SYNTHETIC galleries (CPU).

    python -m benchmarks.bench_gallery [--sizes 10000,50000,100000] [--shortlist 100] [--threads 1]

Wall seconds and the child's CPU seconds are both shown: on a shared machine the CPU seconds are the
stable figure. Each size runs in a fresh child process: generate the split, save untrained checkpoints, then
evaluate.main with both checkpoints and --shortlist K. The global shortlisting and the local re-ranking
are timed inside that run, each with the peak resident memory reached during it (Linux VmHWM, reset
before each stage through /proc/self/clear_refs); the whole evaluation's peak includes loading and
encoding. At 10,000 items (--full_sizes) the full evaluation (every pair scored) runs too, and the
ratios are reported. Dimensions are realistic but modest so that 100,000 items fit a 2-core CPU: CNN 512,
BoVW 64 per block, embedding 256, word 300 (the paper's 4096 / 500 / 1024 scale the encoders and
the local embeddings, not the algorithm).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from data import NUM_BLOCKS
from runtime.layout import COARSE_FOLDER, FINE_FOLDER

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"cnn_dim": 512, "bovw_dim": 64}
MODEL_FLAGS = ["--embed_size", "256", "--word_dim", "300", "--batch_size", "500", "--device", "cpu"]


def _peak_rss_mb() -> float:
    """This process's peak resident set since start or the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class StageMeter:
    """Wraps functions so each call's seconds and peak RSS are added to a named stage."""

    def __init__(self):
        self.figures: dict[str, dict] = {}
        self.overall_peak_mb = 0.0

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.overall_peak_mb = max(self.overall_peak_mb, _peak_rss_mb())
            _reset_peak()
            start, start_cpu = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            stage = self.figures.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_mb": 0.0})
            stage["seconds"] += time.perf_counter() - start
            stage["cpu_seconds"] += time.process_time() - start_cpu
            stage["peak_rss_mb"] = max(stage["peak_rss_mb"], _peak_rss_mb())
            return result
        return timed

    def peak(self) -> float:
        return max(self.overall_peak_mb, _peak_rss_mb())


def _generate(folder: str, n: int, chunk: int = 10000) -> None:
    """synthetic.py's test split of n items, written chunk by chunk into .npy memmaps (low memory)."""
    import numpy as np
    from synthetic import NOTICE, SyntheticSpec
    spec = SyntheticSpec(0, 50, 260, DIMS["cnn_dim"], DIMS["bovw_dim"])
    outputs = {}
    for granularity, block_axis in ((FINE_FOLDER, (NUM_BLOCKS,)), (COARSE_FOLDER, ())):
        out = os.path.join(folder, granularity, "bench_precomp")
        os.makedirs(out, exist_ok=True)
        Path(out, "SYNTHETIC.txt").write_text(NOTICE)
        outputs[granularity] = {kind: np.lib.format.open_memmap(
            os.path.join(out, f"test_{kind}.npy"), mode="w+", dtype=np.float32, shape=(n, *block_axis, DIMS[dim]))
            for kind, dim in (("cnns", "cnn_dim"), ("bovws", "bovw_dim"))}
    labels, captions = [], []
    for start in range(0, n, chunk):
        items = spec.sample(np.random.default_rng([0, start]), min(chunk, n - start))
        labels.append(items["labels"])
        captions += items["captions"]
        for granularity, arrays in outputs.items():
            for kind, array in arrays.items():
                blocks = items[f"local_{kind}"]
                array[start:start + len(blocks)] = blocks if granularity == FINE_FOLDER else blocks.mean(1)
    for granularity, arrays in outputs.items():
        for array in arrays.values():
            array.flush()
        out = os.path.join(folder, granularity, "bench_precomp")
        np.save(os.path.join(out, "test_labels.npy"), np.concatenate(labels))
        Path(out, "test_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")


def _prepare(folder: str, n: int) -> dict:
    """A SYNTHETIC test split of n items (both granularities), its vocabulary and untrained checkpoints."""
    from runtime.checkpoint import save_checkpoint
    from model_factory import build_model
    from options import parse_options
    from vocab import build_vocab, save_vocab, vocab_file
    _generate(folder, n)
    caps = os.path.join(folder, COARSE_FOLDER, "bench_precomp", "test_caps.txt")
    vocab = build_vocab([caps], threshold=1)
    save_vocab(vocab, vocab_file(folder, "bench_precomp"))
    paths = {}
    for kind in ("global", "local"):
        data = os.path.join(folder, COARSE_FOLDER if kind == "global" else FINE_FOLDER)
        opt = parse_options(kind, ["--data_path", data, "--data_name", "bench_precomp", "--vocab_path", folder,
                                   "--cnn_dim", str(DIMS["cnn_dim"]), "--bovw_dim", str(DIMS["bovw_dim"]),
                                   *MODEL_FLAGS])
        torch.manual_seed(0)
        model = build_model(kind, opt, len(vocab))
        paths[kind] = os.path.join(folder, f"{kind}.pth.tar")
        save_checkpoint({"kind": kind, "model": model.state_dict(), "opt": opt, "vocab": vocab.word2idx,
                         "epoch": 0}, paths[kind])
    return paths


def _evaluate_child(folder: str, shortlist: int) -> None:
    """Run in a fresh process: evaluate.main on the prepared split, print stage figures as JSON."""
    import evaluate
    import gallery
    meter = StageMeter()
    gallery.global_shortlists = meter.wrap("global_shortlisting", gallery.global_shortlists)
    gallery.shortlist_local_scores = meter.wrap("local_reranking", gallery.shortlist_local_scores)
    argv = ["--global_ckpt", os.path.join(folder, "global.pth.tar"),
            "--local_ckpt", os.path.join(folder, "local.pth.tar"),
            "--global_data_path", os.path.join(folder, COARSE_FOLDER),
            "--local_data_path", os.path.join(folder, FINE_FOLDER),
            "--fusion_weight", "0.5", "--device", "cpu", "--output", os.path.join(folder, f"eval_{shortlist}.json")]
    if shortlist:
        argv += ["--shortlist", str(shortlist)]
    start, start_cpu = time.perf_counter(), time.process_time()
    summary = evaluate.main(argv)
    whole = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu,
             "peak_rss_mb": meter.peak()}
    fused = summary["rows"]["fused"]
    print(json.dumps({**meter.figures, "whole_evaluation": whole,
                      "fused_mAP": [fused["i2t"]["mAP"], fused["t2i"]["mAP"]]}))


def _child(code: str, threads: int) -> dict:
    """Run code in a fresh interpreter from the repository root; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); {code}"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_gallery_size(n: int, shortlist: int = 100, full: bool = False, threads: int = 1) -> dict:
    """Figures of one gallery size: shortlist evaluation stages, and the full evaluation when asked."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        _child(f"import json; from benchmarks import bench_gallery; "
               f"print(json.dumps(bench_gallery._prepare({folder!r}, {n})))", threads)
        figures = {"items": n, "prepare_s": time.perf_counter() - start,
                   "shortlist": _child(f"from benchmarks import bench_gallery; "
                                       f"bench_gallery._evaluate_child({folder!r}, {shortlist})", threads)}
        if full:
            figures["full"] = _child(f"from benchmarks import bench_gallery; "
                                     f"bench_gallery._evaluate_child({folder!r}, 0)", threads)
    return figures


def _table(all_figures: list[dict], shortlist: int) -> str:
    lines = [f"{'items':>8s}  {'stage':<22s} {'seconds':>9s} {'CPU s':>9s} {'peak RSS MB':>12s}"]
    for figures in all_figures:
        for stage, values in figures["shortlist"].items():
            if isinstance(values, dict):
                lines.append(f"{figures['items']:8d}  {stage:<22s} {values['seconds']:9.1f} "
                             f"{values['cpu_seconds']:9.1f} {values['peak_rss_mb']:12.0f}")
        if "full" in figures:
            full, short = figures["full"]["whole_evaluation"], figures["shortlist"]["whole_evaluation"]
            lines.append(f"{figures['items']:8d}  {'full evaluation':<22s} {full['seconds']:9.1f} "
                         f"{full['cpu_seconds']:9.1f} {full['peak_rss_mb']:12.0f}")
            lines.append(f"{'':8s}  full / --shortlist {shortlist}: CPU time "
                         f"{full['cpu_seconds'] / short['cpu_seconds']:.1f}x, "
                         f"memory {full['peak_rss_mb'] / short['peak_rss_mb']:.1f}x; fused mAP "
                         f"full {figures['full']['fused_mAP']} vs mAP@{shortlist} {figures['shortlist']['fused_mAP']}")
    return "\n".join(lines)


def bench_gallery(sizes: tuple[int, ...] = (10000, 50000, 100000), shortlist: int = 100, threads: int = 1,
                  full_sizes: tuple[int, ...] = (10000,)) -> dict:
    """All sizes, with the full evaluation too at full_sizes. Returns the figures with a printable table."""
    all_figures = [bench_gallery_size(n, shortlist, full=n in full_sizes, threads=threads) for n in sizes]
    return {"table": "\n" + _table(all_figures, shortlist), "figures": all_figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,100000", help="gallery sizes (items = images = captions)")
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--full_sizes", default="10000", help="sizes where the full evaluation runs too ('' for none)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in the children (default 1: stable on a shared machine)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, CPU; SYNTHETIC data, CNN "
          f"{DIMS['cnn_dim']}, BoVW {DIMS['bovw_dim']}, embedding 256", flush=True)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    full_sizes = {int(s) for s in args.full_sizes.split(",") if s}
    for n in sizes:  # printed as each size finishes: the large ones take minutes
        figures = bench_gallery_size(n, args.shortlist, full=n in full_sizes, threads=args.threads)
        print(_table([figures], args.shortlist), flush=True)


if __name__ == "__main__":
    main()
