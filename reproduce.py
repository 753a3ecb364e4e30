"""One command from prepared features (both granularities) to the results table of M2HSE.

  python reproduce.py --data_name rsicd_precomp --epochs 4 --seeds 1,2,3 --embed_size 128 --batch_size 64

For every seed it trains the global and local subnetworks, and both again without auxiliary terms
(alpha = beta = 0), keeps each freshly initialised model, and evaluates on test the untrained, trained
and ablated subnetworks and their fusion (w tuned on dev). It writes results/<data_name>/table.md and
table.json (mean and standard deviation over seeds). Other flags (--embed_size, --learning_rate, ...)
go to both training scripts. A rerun skips every finished stage and resumes an interrupted training; a stage whose data files
or checkpoints changed runs again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import evaluate
import provenance
import run_folder
import trainer
from checkpoint import load_checkpoint, save_checkpoint
from errors import InputError, report_errors
from files import atomic_write_bytes, check_writable
from models import build_model
from options import changed_options, parse_options
from vocab import build_vocab, load_vocab, save_vocab, vocab_file

AUX_WEIGHTS = {"global": ("alpha_1", "alpha_2"), "local": ("beta_1", "beta_2")}
VARIANTS = {"full": "", "noaux": "without auxiliary terms"}
UNTRAINED = "untrained.pth.tar"
# evaluation name -> (training variant, checkpoint file) of both subnetworks
EVALUATIONS = {"untrained": ("full", UNTRAINED), "trained": ("full", trainer.BEST), "noaux": ("noaux", trainer.BEST)}
# table row -> (evaluation, row of its evaluate.py output, training variant whose dev curve is checked)
ROWS = {
    "global, untrained": ("untrained", "global", None),
    "local, untrained": ("untrained", "local", None),
    "fused, untrained": ("untrained", "fused", None),
    "global": ("trained", "global", "full"),
    "local": ("trained", "local", "full"),
    "fused (w tuned on dev)": ("trained", "fused", "full"),
    "global, no auxiliary terms": ("noaux", "global", "noaux"),
    "local, no auxiliary terms": ("noaux", "local", "noaux"),
    "fused, no auxiliary terms": ("noaux", "fused", "noaux"),
}
METRICS = (("i2t", "mAP"), ("t2i", "mAP"), ("mean", "mAP"), ("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"),
           ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10"))
# Flags reproduce.py sets itself for every run; they may not be passed through.
OWN_FLAGS = ("--data_path", "--seed", "--num_epochs", "--logger_name", "--model_name", "--resume", "--overwrite")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """reproduce.py's own flags, and the rest (passed through to the training scripts)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --seed must not be read as --seeds
    p.add_argument("--global_data_path", default="./data/coarse-grained-data")
    p.add_argument("--local_data_path", default="./data/fine-grained-data")
    p.add_argument("--data_name", default="corel5k_precomp")
    p.add_argument("--vocab_path", default="./vocab", help="built from train and dev captions when missing")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of every subnetwork")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    p.add_argument("--cnn_dim", type=int, help="CNN feature width (default: summary.json of the data, else 4096)")
    p.add_argument("--bovw_dim", type=int, help="BoVW feature width (default: summary.json of the data, else 500)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--results_dir", default="./results", help="tables go to <results_dir>/<data_name>/")
    p.add_argument("--runs_dir", default="./runs", help="checkpoints and logs go to <runs_dir>/<data_name>/")
    args, passthrough = p.parse_known_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    own = [flag for flag in passthrough if flag.split("=")[0] in OWN_FLAGS]
    if own:
        p.error(f"{own[0].split('=')[0]} is set by reproduce.py for each run (use --epochs, --seeds, "
                "--global_data_path / --local_data_path, --runs_dir)")
    return args, passthrough


def flags_for(kind: str, passthrough: list[str]) -> list[str]:
    """The pass-through flags that apply to one subnetwork: --alpha_* go to global, --beta_* to local."""
    other = AUX_WEIGHTS["local" if kind == "global" else "global"]
    kept, skip_value = [], False
    for token in passthrough:
        if skip_value:
            skip_value = False
            continue
        name = token.split("=")[0].lstrip("-")
        if name in other:
            skip_value = "=" not in token
            continue
        kept.append(token)
    return kept


def feature_dims(args: argparse.Namespace) -> list[str]:
    """--cnn_dim / --bovw_dim for the training scripts: given, else read from the data's summary.json."""
    path = os.path.join(args.global_data_path, args.data_name, "summary.json")
    dims = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                dims = json.load(f).get("dims", {})
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: not a readable JSON summary ({err})") from None
    flags = []
    for name, given in (("cnn", args.cnn_dim), ("bovw", args.bovw_dim)):
        width = given or dims.get(name)
        if width:
            flags += [f"--{name}_dim", str(width)]
    return flags


def ensure_vocab(args: argparse.Namespace) -> None:
    """Build the vocabulary the authors' way (train and dev captions, threshold 2) when there is none."""
    path = vocab_file(args.vocab_path, args.data_name)
    if os.path.isfile(path):
        return
    folder = os.path.join(args.global_data_path, args.data_name)
    captions = [os.path.join(folder, f"{split}_caps.txt") for split in ("train", "dev")]
    save_vocab(build_vocab([c for c in captions if os.path.isfile(c)] or captions), path)
    print(f"built the vocabulary {path} from the train and dev captions (threshold 2; vocab.py builds others)")


class Timings:
    """Wall time of every stage that ran, kept in a JSON file so a rerun still reports skipped stages."""

    def __init__(self, path: str):
        self.path = path
        self.seconds = self._read()

    def _read(self) -> dict[str, float]:
        if not os.path.isfile(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def record(self, stage: str, seconds: float) -> None:
        # Read again first: seeds may run in parallel processes that share this file.
        self.seconds = {**self._read(), stage: round(seconds, 1)}
        write_json(self.path, self.seconds)


def write_json(path: str, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2).encode("utf-8"))


class Reproduction:
    """Every stage of one reproduce.py call: its runs, their folders and what is already finished."""

    def __init__(self, args: argparse.Namespace, passthrough: list[str]):
        self.args, self.passthrough = args, passthrough
        self.dims = feature_dims(args)
        self.results = os.path.join(args.results_dir, args.data_name)
        self.timings = Timings(os.path.join(self.results, "timings.json"))
        self.stage, self.stages = 0, len(args.seeds) * (len(VARIANTS) * len(AUX_WEIGHTS) + len(EVALUATIONS))

    def data_path(self, kind: str) -> str:
        return self.args.global_data_path if kind == "global" else self.args.local_data_path

    def run_folder(self, variant: str, kind: str, seed: int) -> str:
        return os.path.join(self.args.runs_dir, self.args.data_name, variant, kind, f"seed{seed}")

    def train_argv(self, variant: str, kind: str, seed: int) -> list[str]:
        folder = self.run_folder(variant, kind, seed)
        argv = ["--data_path", self.data_path(kind), "--data_name", self.args.data_name, "--vocab_path",
                self.args.vocab_path, "--num_epochs", str(self.args.epochs), "--seed", str(seed), "--device",
                self.args.device, "--logger_name", folder, "--model_name", folder, *self.dims,
                *flags_for(kind, self.passthrough)]
        if variant == "noaux":  # after the pass-through flags, so these win
            argv += [token for name in AUX_WEIGHTS[kind] for token in (f"--{name}", "0")]
        return argv

    def announce(self, seed: int, what: str) -> None:
        self.stage += 1
        print(f"\n== [{self.stage}/{self.stages}] seed {seed}: {what}", flush=True)

    def train(self, variant: str, kind: str, seed: int) -> None:
        """Train one run to --epochs (resuming it if interrupted) unless it is finished."""
        name = f"{kind} {VARIANTS[variant]}".strip()
        self.announce(seed, f"training {name}, {self.args.epochs} epochs")
        argv = self.train_argv(variant, kind, seed)
        opt = parse_options(kind, argv)
        folder = opt["model_name"]
        untrained = os.path.join(folder, UNTRAINED)
        if variant == "full" and (not os.path.isfile(untrained) or data_change(untrained, opt)):
            save_untrained(kind, opt, untrained)
        last = os.path.join(folder, trainer.LAST)
        if os.path.isfile(last):
            done, change = finished(last, opt), data_change(last, opt)
            if change:  # the run belongs to other data: train again, the old run is archived
                print(f"the data changed since {last} was trained ({change}): training again", flush=True)
                argv += ["--overwrite"]
            elif done:
                print(f"finished earlier ({last}), skipped", flush=True)
                return
            else:
                argv += ["--resume", last]
        elif run_folder.run_files(folder):  # logs of a run stopped before its first checkpoint: start it again
            argv += ["--overwrite"]
        start = time.time()
        trainer.main(kind, argv)
        self.timings.record(f"seed{seed}/train/{variant}/{kind}", time.time() - start)

    def evaluate(self, name: str, seed: int) -> dict:
        """evaluate.py on both subnetworks of one evaluation, unless its JSON is newer than the checkpoints."""
        self.announce(seed, f"evaluating {name} subnetworks and their fusion")
        variant, filename = EVALUATIONS[name]
        ckpts = {kind: os.path.join(self.run_folder(variant, kind, seed), filename) for kind in AUX_WEIGHTS}
        output = os.path.join(self.results, f"seed{seed}", f"{name}.json")
        earlier = self.earlier_evaluation(output, ckpts)
        if earlier is not None:
            print(f"evaluated earlier ({output}), skipped", flush=True)
            return earlier
        start = time.time()
        summary = evaluate.main(["--global_ckpt", ckpts["global"], "--local_ckpt", ckpts["local"], "--tune_fusion",
                                 "--global_data_path", self.args.global_data_path, "--local_data_path",
                                 self.args.local_data_path, "--device", self.args.device, "--output", output])
        self.timings.record(f"seed{seed}/evaluate/{name}", time.time() - start)
        return summary

    def earlier_evaluation(self, output: str, ckpts: dict[str, str]) -> dict | None:
        """The summary in output when it was made from these very checkpoints and data files, else None."""
        try:
            with open(output, encoding="utf-8") as f:
                summary = json.load(f)
            same = all(summary["checkpoint_sha256"][kind] == provenance.sha256_file(path) for kind, path in
                       ckpts.items())
            folders = {kind: provenance.data_fingerprint(os.path.join(self.data_path(kind), self.args.data_name))
                       for kind in ckpts}
            same = same and all(read["fingerprint"] == folders[kind] for kind, splits in summary["data"].items()
                                for read in splits.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, damaged or older: evaluate again
            return None
        if not same:
            print(f"{output}: made from other checkpoints or data files; evaluating again", flush=True)
        return summary if same else None

    def run(self) -> dict[int, dict[str, dict]]:
        """Every stage, seed by seed; returns the evaluation summaries by seed and name."""
        evaluations = {}
        for seed in self.args.seeds:
            for variant in VARIANTS:
                for kind in AUX_WEIGHTS:
                    self.train(variant, kind, seed)
            evaluations[seed] = {name: self.evaluate(name, seed) for name in EVALUATIONS}
        return evaluations


def save_untrained(kind: str, opt: dict, path: str) -> None:
    """Checkpoint of the freshly initialised subnetwork: the seed and build order of trainer.Trainer."""
    torch.manual_seed(opt["seed"])
    vocab = load_vocab(vocab_file(opt["vocab_path"], opt["data_name"]))
    model = build_model(kind, opt, len(vocab))
    data = provenance.data_fingerprint(os.path.join(opt["data_path"], opt["data_name"]))
    save_checkpoint({"kind": kind, "model": model.state_dict(), "opt": opt, "vocab": vocab.word2idx, "epoch": 0,
                     "data": data}, path)


def finished(last: str, opt: dict) -> bool:
    """Whether a run's last checkpoint has trained and evaluated --epochs epochs with these options."""
    ckpt = load_checkpoint(last, opt["kind"])
    changes = changed_options(ckpt["opt"], opt)
    if changes:
        raise InputError(f"{last}: this run was trained with other settings ({'; '.join(changes.values())}); "
                         f"use another --runs_dir or delete {os.path.dirname(last)}")
    if ckpt["epoch"] > opt["num_epochs"]:
        raise InputError(f"{last}: this run has trained {ckpt['epoch']} epochs, more than --epochs "
                         f"{opt['num_epochs']}; use another --runs_dir or the same --epochs")
    return ckpt["epoch"] == opt["num_epochs"] and ckpt.get("evaluated", True)


def data_change(path: str, opt: dict) -> str:
    """The train and validation files that differ from those a checkpoint records; '' when none (or no record)."""
    recorded = load_checkpoint(path, opt["kind"]).get("data")
    if not isinstance(recorded, dict):
        return ""
    current = provenance.data_fingerprint(os.path.join(opt["data_path"], opt["data_name"]))
    return ", ".join(name for split in ("train", opt["val_split"])
                     for name in provenance.changed_files(recorded, current, split))


def dev_curve(folder: str) -> dict[int, float]:
    """Dev rsum (i2t + t2i mAP) by epoch from a run's performance.log; a re-evaluated epoch keeps its last line."""
    path, curve = os.path.join(folder, "performance.log"), {}
    if not os.path.isfile(path):
        raise InputError(f"{path}: not found; the run's dev scores are read from it")
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            curve[int(fields[1])] = float(fields[fields.index("rsum") + 1])
    return curve


def still_rising(curve: dict[int, float]) -> bool:
    """The last epoch scored better on dev than every earlier one (so more epochs might help)."""
    last = max(curve)
    return curve[last] > max(value for epoch, value in curve.items() if epoch != last)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def metric_value(row: dict, direction: str, metric: str) -> float:
    return row["mean_mAP"] if direction == "mean" else row[direction][metric]


def rising_note(repro: Reproduction, variant: str | None, kinds: list[str]) -> str:
    """'2/3' seeds whose dev mAP still rose at the last epoch, per subnetwork behind a row."""
    if variant is None:
        return "-"
    counts = []
    for kind in kinds:
        rising = sum(still_rising(dev_curve(repro.run_folder(variant, kind, s))) for s in repro.args.seeds)
        counts.append(f"{kind} {rising}/{len(repro.args.seeds)}" if len(kinds) > 1 else f"{rising}/{len(repro.args.seeds)}")
    return ", ".join(counts)


def build_table(repro: Reproduction, evaluations: dict[int, dict[str, dict]]) -> dict:
    """Mean and std over seeds of every row and metric, with fusion weights, dev trends and wall times."""
    rows = {}
    for label, (name, row, variant) in ROWS.items():
        per_seed = [evaluations[s][name]["rows"][row] for s in repro.args.seeds]
        kinds = list(AUX_WEIGHTS) if row == "fused" else [row]
        rows[label] = {f"{d} {m}": mean_std([metric_value(r, d, m) for r in per_seed]) for d, m in METRICS}
        rows[label]["dev_rising_at_last_epoch"] = rising_note(repro, variant, kinds)
    first = evaluations[repro.args.seeds[0]]["trained"]
    wall = repro.timings.seconds
    return {"data_name": repro.args.data_name, "split": first["split"], "images": first["images"],
            "captions_per_image": first["captions_per_image"], "seeds": repro.args.seeds,
            "epochs": repro.args.epochs, "training_flags": repro.dims + repro.passthrough,
            "fusion_weights": {name: {s: evaluations[s][name]["fusion_weight"] for s in repro.args.seeds}
                               for name in EVALUATIONS},
            "rows": rows, "wall_time_s": wall, "total_wall_time_s": round(sum(wall.values()), 1)}


def format_markdown(table: dict) -> str:
    """table.md: one line per row, mean ± std over seeds."""
    seeds = ", ".join(map(str, table["seeds"]))
    head = ["model"] + [f"{d} {m}" if d != "mean" else "mean mAP" for d, m in METRICS] + ["dev mAP rising at last epoch"]
    lines = [f"# M2HSE on {table['data_name']}: {table['split']} split, mean ± std over seeds {seeds}", "",
             f"{table['images']} images with {table['captions_per_image']} captions each.",
             f"{table['epochs']} epochs per subnetwork; training flags: {' '.join(table['training_flags']) or 'defaults'}.",
             "mAP@all and R@K in percent; std is the sample standard deviation over seeds. Fusion weight w tuned on "
             "dev per seed: " + "; ".join(f"{name} " + ", ".join(f"{w:.2f}" for w in ws.values())
                                          for name, ws in table["fusion_weights"].items()) + ".",
             "The last column counts the seeds whose dev i2t + t2i mAP at the last epoch beat every earlier epoch.",
             f"Wall time of all stages: {table['total_wall_time_s'] / 60:.1f} min.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table["rows"].items():
        cells = [f"{row[f'{d} {m}']['mean']:.2f} ± {row[f'{d} {m}']['std']:.2f}" for d, m in METRICS]
        lines.append("| " + " | ".join([label, *cells, row["dev_rising_at_last_epoch"]]) + " |")
    return "\n".join(lines) + "\n"


@report_errors
def main(argv: list[str] | None = None) -> dict:
    args, passthrough = parse_args(argv)
    check_writable(args.results_dir, "--results_dir")
    check_writable(args.runs_dir, "--runs_dir")
    ensure_vocab(args)
    for kind in AUX_WEIGHTS:  # bad pass-through flags stop here, before anything trains
        parse_options(kind, flags_for(kind, passthrough))
    repro = Reproduction(args, passthrough)
    table = build_table(repro, repro.run())
    write_json(os.path.join(repro.results, "table.json"), table)
    markdown = format_markdown(table)
    atomic_write_bytes(os.path.join(repro.results, "table.md"), markdown.encode("utf-8"))
    print("\n" + markdown + f"\nwrote {repro.results}/table.md and table.json")
    return table


if __name__ == "__main__":
    main()
