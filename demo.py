"""One-command demo on a SYNTHETIC dataset: generate it, build the vocabulary, train both subnetworks a few
epochs, evaluate untrained and trained models and the fused score on its test split.

  python demo.py            (about 2-3 minutes on a 2-core CPU)
"""
from __future__ import annotations

import argparse
import os

import evaluate
import trainer
from data import PrecompDataset, has_split
from model_factory import untrained_model
from options import parse_options
from runtime.device import resolve_device
from runtime.errors import InputError, check_number, report_errors
from runtime.files import check_writable
from runtime.layout import COARSE_FOLDER, FINE_FOLDER
from scoring import validate
from synthetic import NOTICE, generate
from vocab import build_vocab, load_vocab, read_captions, save_vocab, vocab_file

NAME = "synthetic_precomp"
KINDS = {"global": COARSE_FOLDER, "local": FINE_FOLDER}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train and evaluate M2HSE on a generated SYNTHETIC dataset.")
    p.add_argument("--data_path", default="./data")
    p.add_argument("--vocab_path", default="./vocab")
    p.add_argument("--run_dir", default="./checkpoint/demo")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--sizes", default="1000,250,250", help="train,dev,test items")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    check_number("--epochs", args.epochs, minimum=1)
    args.sizes = parse_sizes(args.sizes)
    return args


def parse_sizes(text: str) -> dict[str, int]:
    """--sizes train,dev,test as three positive integers."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"--sizes must be three positive integers train,dev,test (e.g. 1000,250,250), got {text!r}")
    return dict(zip(("train", "dev", "test"), map(int, parts)))


def existing_sizes(data_path: str) -> dict[str, int] | None:
    """Items per split of the generated data in both granularities, or None when incomplete or they differ."""
    found = set()
    for folder in KINDS.values():
        if not all(has_split(os.path.join(data_path, folder), NAME, s) for s in ("train", "dev", "test")):
            return None
        found.add(tuple(len(read_captions(os.path.join(data_path, folder, NAME, f"{s}_caps.txt")))
                        for s in ("train", "dev", "test")))
    return dict(zip(("train", "dev", "test"), found.pop())) if len(found) == 1 else None


def prepare(args: argparse.Namespace) -> None:
    """Generate the dataset (again when --sizes changed) and its vocabulary."""
    coarse = os.path.join(args.data_path, KINDS["global"])
    if existing_sizes(args.data_path) != args.sizes:
        generate(args.data_path, NAME, args.sizes)
    caps = [os.path.join(coarse, NAME, f"{s}_caps.txt") for s in ("train", "dev")]
    save_vocab(build_vocab(caps), vocab_file(args.vocab_path, NAME))


def train_argv(args: argparse.Namespace, kind: str) -> list[str]:
    run = os.path.join(args.run_dir, kind)
    return ["--data_path", os.path.join(args.data_path, KINDS[kind]), "--data_name", NAME,
            "--vocab_path", args.vocab_path, "--logger_name", run, "--model_name", run,
            "--num_epochs", str(args.epochs), "--device", args.device]


def untrained_map(args: argparse.Namespace, kind: str) -> float:
    """Mean of i2t and t2i mAP on test of a freshly initialised subnetwork (same seed as training)."""
    opt = parse_options(kind, train_argv(args, kind))
    vocab = load_vocab(vocab_file(args.vocab_path, NAME))
    device = resolve_device(args.device)
    model = untrained_model(kind, opt, len(vocab)).to(device)
    test = PrecompDataset(opt["data_path"], NAME, "test", vocab, kind, opt["cnn_dim"], opt["bovw_dim"])
    return validate(model, test, opt["batch_size"], device)["rsum"] / 2


@report_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for folder, flag in ((args.data_path, "--data_path"), (args.vocab_path, "--vocab_path"), (args.run_dir, "--run_dir")):
        check_writable(folder, f"{flag} folder")
    print(NOTICE, flush=True)
    prepare(args)
    before = {}
    for kind in KINDS:
        before[kind] = untrained_map(args, kind)
        print(f"\n== training the {kind}-level subnetwork on SYNTHETIC data ({args.epochs} epochs)", flush=True)
        trainer.main(kind, train_argv(args, kind))
    print("\n== SYNTHETIC test split: trained subnetworks and their fusion (w tuned on dev)", flush=True)
    ckpts = {kind: os.path.join(args.run_dir, kind, "model_best.pth.tar") for kind in KINDS}
    summary = evaluate.run(evaluate.EvaluationConfig(global_ckpt=ckpts["global"], local_ckpt=ckpts["local"],
                                                     tune_fusion=True, device=args.device,
                                                     output=os.path.join(args.run_dir, "demo_test.json")))
    print("\nSYNTHETIC data, mean of i2t and t2i mAP (%) on test:")
    for kind in KINDS:
        print(f"  {kind:6s} untrained {before[kind]:6.2f}  ->  trained {summary['rows'][kind]['mean_mAP']:6.2f}")
    print(f"  fused  (w = {summary['fusion_weight']:.2f})          ->  trained {summary['rows']['fused']['mean_mAP']:6.2f}")


if __name__ == "__main__":
    main()
