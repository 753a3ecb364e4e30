"""Mixed precision (--amp) against full precision: losses, dev mAP and time of the same training runs.

    python -m benchmarks.bench_amp [--modes off,bf16] [--epochs 3] [--train 400] [--device auto]

Each subnetwork is trained from the same seed on the same generated SYNTHETIC data (full feature and
model sizes) once per mode. Step 1 sees identical weights, so its loss difference is the precision
difference alone; later steps add the drift of the weights. fp16 needs CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import torch

import trainer
from runtime.layout import COARSE_FOLDER, FINE_FOLDER
from synthetic import generate
from vocab import build_vocab, save_vocab, vocab_file

DATA_NAME = "amp_precomp"


def make_data(root: str, train: int) -> None:
    generate(root, DATA_NAME, {"train": train, "dev": train // 4, "test": 0}, seed=5)
    caps = [os.path.join(root, COARSE_FOLDER, DATA_NAME, f"{s}_caps.txt") for s in ("train", "dev")]
    save_vocab(build_vocab(caps, threshold=1), vocab_file(os.path.join(root, "vocab"), DATA_NAME))


def train(kind: str, amp: str, root: str, args: argparse.Namespace) -> dict:
    """Train one run quietly; its step losses, final dev rsum and seconds per epoch."""
    run_dir = os.path.join(root, f"{kind}-{amp}")
    argv = ["--data_path", os.path.join(root, COARSE_FOLDER if kind == "global" else FINE_FOLDER), "--data_name", DATA_NAME,
            "--vocab_path", os.path.join(root, "vocab"), "--logger_name", run_dir, "--model_name", run_dir,
            "--num_epochs", str(args.epochs), "--batch_size", "100", "--log_step", "1", "--amp", amp,
            "--device", args.device]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.main(kind, argv)
    seconds = (time.perf_counter() - start) / args.epochs
    with open(os.path.join(run_dir, "loss.log"), encoding="utf-8") as f:
        losses = [float(line.split(" loss ")[1].split()[0]) for line in f]
    with open(os.path.join(run_dir, "performance.log"), encoding="utf-8") as f:
        rsum = float(f.read().split()[-1])
    return {"losses": losses, "rsum": rsum, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="off,bf16", help="comma-separated --amp values; the first is the baseline")
    p.add_argument("--kinds", default="global,local")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=400, help="generated train items (dev: a quarter)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args()
    modes = args.modes.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.train} SYNTHETIC train items, "
          f"batch 100, {args.epochs} epochs, 4096 / 500 / 300 / 1024")
    print(f"{'kind':7} {'amp':5} {'s/epoch':>8} {'loss step 1':>12} {'|d| step 1':>11} "
          f"{'max |d| (all steps)':>20} {'dev rsum':>9}")
    with tempfile.TemporaryDirectory() as root:
        make_data(root, args.train)
        for kind in args.kinds.split(","):
            runs = {amp: train(kind, amp, root, args) for amp in modes}
            base = runs[modes[0]]
            for amp, run in runs.items():
                diffs = [abs(a - b) for a, b in zip(run["losses"], base["losses"])]
                print(f"{kind:7} {amp:5} {run['seconds']:8.1f} {run['losses'][0]:12.6f} {diffs[0]:11.2e} "
                      f"{max(diffs):20.2e} {run['rsum']:9.2f}")


if __name__ == "__main__":
    main()
