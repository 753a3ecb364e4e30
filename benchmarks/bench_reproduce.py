"""Seconds of one training epoch and one dev evaluation at RSICD size, to choose reproduce.py settings (CPU).

  python -m benchmarks.bench_reproduce --settings 256:128,512:128 --epochs 10 --seeds 3

RSICD: 8,734 train images with 5 captions each (43,670 training items an epoch), dev 1,094 images
(5,470 captions), EfficientNet-Lite0 features (cnn_dim 1280), BoVW 500, 31 classes, captions of about
11.5 words. An epoch is timed on a fraction of the train split and scaled by the number of captions;
the dev evaluation is timed at full size.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from runtime.layout import COARSE_FOLDER, FINE_FOLDER

RSICD = dict(train_captions=43670, dev_images=1094, captions_per_image=5, cnn_dim=1280, bovw_dim=500, categories=31)
FOLDERS = {"global": COARSE_FOLDER, "local": FINE_FOLDER}


def time_subnetwork(root: str, kind: str, embed_size: int, batch_size: int, cpu_time: bool) -> dict:
    """Measured seconds of one epoch over the generated train split and of one dev evaluation
    (CPU seconds of this process with cpu_time: what an idle machine would take, whatever the load)."""
    from options import parse_options
    from trainer import Trainer
    run = f"{root}/run_{kind}_{embed_size}_{batch_size}"
    opt = parse_options(kind, ["--data_path", f"{root}/{FOLDERS[kind]}", "--data_name", "bench_precomp",
                               "--vocab_path", root, "--logger_name", run, "--model_name", run, "--device", "cpu",
                               "--cnn_dim", str(RSICD["cnn_dim"]), "--bovw_dim", str(RSICD["bovw_dim"]),
                               "--embed_size", str(embed_size), "--batch_size", str(batch_size)])
    trainer = Trainer(kind, opt)
    clock = time.process_time if cpu_time else time.perf_counter
    start = clock()
    trainer.train_epoch()
    train_s = clock() - start
    start = clock()
    trainer.evaluate()
    return {"train_s": train_s, "dev_s": clock() - start, "train_items": len(trainer.train_set)}


def lengthen_captions(root: str, seed: int) -> None:
    """RSICD-like caption lengths (6 to 17 words, mean 11.5) instead of synthetic.py's 1 to 5 keywords:
    the text encoders and the local attention cost grow with the caption length."""
    rng = np.random.default_rng(seed)
    for folder in FOLDERS.values():
        for split in ("train", "dev"):
            path = f"{root}/{folder}/bench_precomp/{split}_caps.txt"
            with open(path, encoding="utf-8") as f:
                captions = f.read().split("\n")[:-1]
            longer = [" ".join(rng.choice(c.split(), rng.integers(6, 18))) for c in captions]
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(longer) + "\n")


def projected_seconds(epoch_s: dict[str, float], dev_s: dict[str, float], epochs: int, seeds: int) -> float:
    """reproduce.py's whole run: per seed two trainings of each subnetwork (full and without auxiliary
    terms), each evaluating dev before training and after every epoch, then three evaluate.py calls
    that score dev and test with both subnetworks."""
    per_seed = sum(2 * (epochs * epoch_s[k] + (epochs + 1) * dev_s[k]) + 3 * 2 * dev_s[k] for k in FOLDERS)
    return seeds * per_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="256:128,512:128", help="embed_size:batch_size pairs")
    p.add_argument("--train", type=int, default=4370, help="generated train captions actually timed")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the projected run")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the projected run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--cpu_time", action="store_true", help="count CPU seconds, not wall seconds (a shared "
                   "machine; meaningful with --threads 1)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from synthetic import generate
    from vocab import build_vocab, save_vocab, vocab_file
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; RSICD sizes {RSICD}")
    with tempfile.TemporaryDirectory() as root:
        k = RSICD["captions_per_image"]
        generate(root, "bench_precomp", {"train": args.train // k, "dev": RSICD["dev_images"]}, RSICD["cnn_dim"],
                 RSICD["bovw_dim"], RSICD["categories"], captions_per_image=k)
        lengthen_captions(root, seed=0)
        save_vocab(build_vocab([f"{root}/{COARSE_FOLDER}/bench_precomp/train_caps.txt"]),
                   vocab_file(root, "bench_precomp"))
        for setting in args.settings.split(","):
            embed_size, batch_size = map(int, setting.split(":"))
            epoch_s, dev_s = {}, {}
            for kind in FOLDERS:
                measured = time_subnetwork(root, kind, embed_size, batch_size, args.cpu_time)
                epoch_s[kind] = measured["train_s"] * RSICD["train_captions"] / measured["train_items"]
                dev_s[kind] = measured["dev_s"]
                print(f"embed {embed_size} batch {batch_size} {kind:6s}: measured {measured['train_s']:6.1f} s for "
                      f"{measured['train_items']} captions, dev {measured['dev_s']:5.1f} s -> RSICD epoch "
                      f"{epoch_s[kind]:6.1f} s, dev evaluation {dev_s[kind]:5.1f} s", flush=True)
            total = projected_seconds(epoch_s, dev_s, args.epochs, args.seeds)
            print(f"embed {embed_size} batch {batch_size}: reproduce.py with {args.epochs} epochs, {args.seeds} seeds "
                  f"~ {total / 60:.0f} min", flush=True)


if __name__ == "__main__":
    main()
