"""CPU benchmark of the batched local attention (model_local) against the looped reference.

    python -m benchmarks.bench_local [--threads 1] [--memory-n 5000]

Both sides of every ratio run in the same process with the same thread count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from data import NUM_BLOCKS
from loss import msb_loss
from model_local import LocalModel
from tests.reference_local import reference_forward, reference_text_image

FULL_OPT = {"cnn_dim": 4096, "bovw_dim": 500, "embed_size": 1024, "word_dim": 300, "num_layers": 1,
            "bi_gru": True, "raw_feature_norm": "clipped_l2norm", "lambda_softmax": 9.0,
            "beta_1": 0.4, "beta_2": 0.4}
VOCAB = 300
MIN_WORDS, MAX_WORDS = 3, 7
N_LABELS = 10
ROOT = Path(__file__).resolve().parents[1]


def _full_model(seed: int = 0) -> LocalModel:
    torch.manual_seed(seed)
    return LocalModel(FULL_OPT, VOCAB)


def _lengths(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(MIN_WORDS, MAX_WORDS + 1, (n,), generator=gen)


def _training_batch(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Block features, padded captions, lengths and labels of one batch."""
    cnn = torch.rand(batch_size, NUM_BLOCKS, FULL_OPT["cnn_dim"], generator=gen)
    bovw = torch.rand(batch_size, NUM_BLOCKS, FULL_OPT["bovw_dim"], generator=gen)
    lengths = _lengths(batch_size, gen)
    captions = torch.randint(4, VOCAB, (batch_size, MAX_WORDS), generator=gen)
    captions[torch.arange(MAX_WORDS)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, N_LABELS, (batch_size,), generator=gen)
    return cnn, bovw, captions, lengths, labels


def _embeddings(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit block embeddings (n, 9, d), zero-padded unit word vectors (n, 7, d) and lengths."""
    d = FULL_OPT["embed_size"]
    images = F.normalize(torch.randn(n, NUM_BLOCKS, d, generator=gen), dim=-1)
    lengths = _lengths(n, gen)
    texts = F.normalize(torch.randn(n, MAX_WORDS, d, generator=gen), dim=-1)
    texts[torch.arange(MAX_WORDS)[None, :] >= lengths[:, None]] = 0
    return images, texts, lengths


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of each of repeats calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _training_step(model: LocalModel, forward: Callable, batch: tuple[torch.Tensor, ...]) -> None:
    """Forward to S_P, S_A1, S_A2, weighted MSB loss, backward."""
    *inputs, labels = batch
    sims = forward(*inputs)
    weights = model.loss_weights()
    loss = sum(weights[key] * msb_loss(sims[key], labels) for key in ("P", "A1", "A2"))
    model.zero_grad()
    loss.backward()


def bench_local_step(batch_size: int = 100, repeats: int = 3) -> dict:
    """Seconds of one local training step, batched vs looped attention (same encoders)."""
    model = _full_model()
    batch = _training_batch(batch_size, torch.Generator().manual_seed(1))
    fast = _timed(lambda: _training_step(model, model, batch), repeats + 1)[1:]  # first is warm-up
    reference = _timed(lambda: _training_step(
        model, lambda *inputs: reference_forward(model, *inputs), batch), 1)
    fast_s = statistics.median(fast)
    return {"batch_size": batch_size, "fast_s": fast_s, "fast_runs_s": fast,
            "reference_s": reference[0], "ratio": reference[0] / fast_s}


def bench_local_scoring(n: int = 1000, reference_n: int = 50, repeats: int = 2) -> dict:
    """primary_similarity of n x n pairs vs the looped reference timed on reference_n^2 pairs."""
    model = _full_model()
    images, texts, lengths = _embeddings(n, torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = _timed(lambda: model.primary_similarity(images, texts, lengths), repeats)
        subset = (images[:reference_n], texts[:reference_n], lengths[:reference_n])
        start = time.perf_counter()
        expected = reference_text_image(*subset)
        reference_s = time.perf_counter() - start
        max_abs_diff = (model.primary_similarity(*subset) - expected).abs().max().item()
    fast_s = min(fast)
    per_pair_s = reference_s / reference_n ** 2
    return {"pairs": n * n, "fast_s": fast_s, "fast_runs_s": fast,
            "reference_pairs_timed": reference_n ** 2, "reference_per_pair_s": per_pair_s,
            "reference_extrapolated_s": per_pair_s * n * n,
            "ratio": per_pair_s * n * n / fast_s, "subset_max_abs_diff": max_abs_diff}


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM).

    Not ru_maxrss: Linux carries the forking parent's peak across exec into the child's ru_maxrss.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_child(n: int) -> None:
    """Run in a fresh process: score n x n pairs with the default chunk, print peak RSS as JSON."""
    model = _full_model()
    images, texts, lengths = _embeddings(n, torch.Generator().manual_seed(3))
    inputs_peak_mb = _peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        model.primary_similarity(images, texts, lengths)
    print(json.dumps({"inputs_peak_rss_mb": inputs_peak_mb, "peak_rss_mb": _peak_rss_mb(),
                      "seconds": time.perf_counter() - start}))


def bench_local_memory(n: int = 5000) -> dict:
    """Peak resident memory of scoring n x n pairs, measured in a child process (Linux VmHWM)."""
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from benchmarks import bench_local; bench_local._memory_child({n})")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           check=True)
    return {"pairs": n * n, **json.loads(child.stdout.strip().splitlines()[-1])}


def _print_table(title: str, figures: dict) -> None:
    print(f"\n{title}")
    for key, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = ", ".join(f"{v:.3g}" for v in value)
        print(f"  {key:<28} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (default 1: stable on a shared machine)")
    parser.add_argument("--memory-n", type=int, default=5000, help="images = captions in the memory run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, CPU")
    _print_table("local training step (B=100, forward + 3 MSB terms + backward)", bench_local_step())
    _print_table("local scoring 1000 x 1000 (reference timed on 50 x 50 pairs, extrapolated per pair)",
                 bench_local_scoring())
    _print_table(f"peak memory, scoring {args.memory_n} x {args.memory_n}, default chunk (child process)",
                 bench_local_memory(args.memory_n))


if __name__ == "__main__":
    main()
