"""Command-line options shared by train_global.py and train_local.py (defaults: the authors' Corel 5K values)."""
from __future__ import annotations

import argparse

from data import MAX_CAPTION_WORDS
from metrics import RELEVANCE
from model_global import GlobalModel
from model_local import LocalModel
from runtime.errors import check_number
from runtime.layout import COARSE_FOLDER, FINE_FOLDER

SUBNETWORK_DEFAULTS = {  # weights: the auxiliary-weight flags and defaults, as each model class defines them
    "global": dict(data_path=f"./data/{COARSE_FOLDER}", run_dir="./checkpoint/M2HSE/Global/Corel5K",
                   weights=tuple(GlobalModel.aux_weights.items())),
    "local": dict(data_path=f"./data/{FINE_FOLDER}", run_dir="./checkpoint/M2HSE/Local/Corel5K",
                  weights=tuple(LocalModel.aux_weights.items())),
}


def build_parser(kind: str) -> argparse.ArgumentParser:
    """Argument parser of one subnetwork's training script."""
    d = SUBNETWORK_DEFAULTS[kind]
    p = argparse.ArgumentParser(description=f"Train the {kind}-level subnetwork of M2HSE.")
    data = p.add_argument_group("data")
    data.add_argument("--data_path", default=d["data_path"], help="folder holding <data_name>/")
    data.add_argument("--data_name", default="corel5k_precomp")
    data.add_argument("--vocab_path", default="./vocab", help="folder holding <data_name>_vocab.json")
    data.add_argument("--cnn_dim", type=int, default=4096, help="width of the CNN features")
    data.add_argument("--bovw_dim", type=int, default=500, help="width of the BoVW features")
    data.add_argument("--val_split", default="dev", help="split used to pick the best epoch")
    data.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    data.add_argument("--max_caption_words", type=int, default=MAX_CAPTION_WORDS,
                      help="longer captions are cut to this many words, with a notice (bounds scoring cost)")
    data.add_argument("--allow_unknown_words", action="store_true",
                      help="go on when most caption words are outside the vocabulary")

    model = p.add_argument_group("model")
    model.add_argument("--word_dim", type=int, default=300)
    model.add_argument("--embed_size", type=int, default=1024)
    model.add_argument("--num_layers", type=int, default=1, help="GRU layers")
    model.add_argument("--bi_gru", action=argparse.BooleanOptionalAction, default=True,
                       help="bidirectional GRU, directions averaged")
    model.add_argument("--text_pooling", choices=("padded_mean", "masked_mean"), default="padded_mean",
                       help="global caption vector: padded_mean is the released code's batch-dependent mean")
    model.add_argument("--raw_feature_norm", default="clipped_l2norm",
                       choices=("clipped_l2norm", "l2norm", "softmax", "no_norm"),
                       help="attention-score normalisation (local subnetwork)")
    model.add_argument("--lambda_softmax", type=float, default=9.0, help="attention temperature (local)")

    loss = p.add_argument_group("loss")
    loss.add_argument("--loss", choices=("msb", "triplet"), default="msb",
                      help="msb: multi-spring balance (the paper's); triplet: VSE++ hinge on the hardest negative")
    loss.add_argument("--margin", type=float, default=0.2, help="triplet margin")
    loss.add_argument("--relevance", choices=RELEVANCE, default="label",
                      help="positives and dev selection: label (shared label, the paper's) or instance (the "
                           "captions of the same image; selection by the sum of R@1/5/10)")
    loss.add_argument("--gamma_1", type=float, default=1.0, help="MSB scale")
    loss.add_argument("--gamma_2", type=float, default=0.5, help="MSB margin")
    loss.add_argument("--Delta", type=float, default=0.1, help="MSB mining margin")
    for name, value in d["weights"]:
        loss.add_argument(f"--{name}", type=float, default=value, help="weight of an auxiliary MSB term")

    train = p.add_argument_group("training")
    train.add_argument("--num_epochs", type=int, default=100, help="epochs (the most, with --early_stop)")
    train.add_argument("--early_stop", type=int, default=0, metavar="P",
                       help="stop when the dev rsum has not improved for P epochs (0: off)")
    train.add_argument("--batch_size", "--batchsize", type=int, default=100)
    train.add_argument("--learning_rate", type=float, default=2e-4)
    train.add_argument("--lr_update", "--lr_updata", type=int, default=50, help="epochs between lr / 10")
    train.add_argument("--grad_clip", type=float, default=2.0, help="gradient-norm clipping")
    train.add_argument("--length_buckets", type=int, default=0, metavar="K",
                       help="draw each batch from a pool of K batches' worth of captions sorted by length: less "
                            "padding, faster; changes the numbers (0: off, the released code's uniform batches)")
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--resume", default="", help="checkpoint to continue from")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in a folder holding another run: its files move to previous-run-<time>/")
    train.add_argument("--allow_option_change", action="store_true",
                       help="resume even though model or training options differ from the checkpoint's")

    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--gpuid", type=int, default=0, help="CUDA device index when on GPU (one process)")
    run.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                     help="mixed precision of the encoders (autocast); fp16 needs CUDA and uses a grad scaler")
    run.add_argument("--dist_timeout", type=float, default=30.0,
                     help="minutes a process waits for the others under torchrun before it stops")
    run.add_argument("--log_step", type=int, default=10, help="batches between loss-log lines")
    run.add_argument("--logger_name", default=d["run_dir"], help="logs and TensorBoard scalars")
    run.add_argument("--model_name", default=d["run_dir"], help="checkpoints")
    return p


def parse_options(kind: str, argv: list[str] | None = None) -> dict:
    """Parsed options of one subnetwork, as a plain dict (what checkpoints store)."""
    opt = vars(build_parser(kind).parse_args(argv))
    check_options(opt, kind)
    opt["kind"] = kind
    return opt


# options that say where and how a run happens, not what it computes: free to change on --resume
RUN_ONLY_OPTIONS = ("resume", "overwrite", "allow_option_change", "num_epochs", "early_stop", "data_path",
                    "vocab_path", "logger_name", "model_name", "device", "gpuid", "workers", "log_step", "amp",
                    "dist_timeout",
                    "max_caption_words", "allow_unknown_words")  # a cap on input length, announced whenever it cuts a caption
SHAPE_OPTIONS = ("cnn_dim", "bovw_dim", "word_dim", "embed_size", "num_layers", "bi_gru")
# options added after checkpoints were first saved: the value a checkpoint without them was trained with
ADDED_OPTIONS = {"loss": "msb", "margin": 0.2, "relevance": "label", "early_stop": 0, "length_buckets": 0}


def saved_option(opt: dict, name: str):
    """An option of a checkpoint, with the value older checkpoints (saved before the option existed) had."""
    return opt.get(name, ADDED_OPTIONS.get(name))


def changed_options(saved: dict, given: dict) -> dict[str, str]:
    """Options that change the model or the training, differing between a checkpoint and this run."""
    saved = {**ADDED_OPTIONS, **saved}
    keys = sorted((saved.keys() | given.keys()) - set(RUN_ONLY_OPTIONS))
    return {k: f"--{k} {saved.get(k, '(absent)')} in the checkpoint, {given.get(k, '(absent)')} given"
            for k in keys if saved.get(k) != given.get(k)}


def check_options(opt: dict, kind: str) -> None:
    """Every numeric flag in range, before any data is read."""
    for name in ("num_epochs", "batch_size", "lr_update", "embed_size", "word_dim", "cnn_dim", "bovw_dim",
                 "num_layers", "log_step", "max_caption_words"):
        check_number(f"--{name}", opt[name], minimum=1)
    for name in ("learning_rate", "gamma_1", "lambda_softmax"):
        check_number(f"--{name}", opt[name], above=0)
    weights = [name for name, _ in SUBNETWORK_DEFAULTS[kind]["weights"]]
    for name in ("grad_clip", "Delta", "workers", "seed", "gpuid", "margin", "early_stop", "length_buckets",
                 *weights):
        check_number(f"--{name}", opt[name], minimum=0)
    check_number("--gamma_2", opt["gamma_2"])
    check_number("--dist_timeout", opt["dist_timeout"], above=0)
