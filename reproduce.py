"""One command from prepared features (both granularities) to the results tables of M2HSE.

  python reproduce.py --data_name rsicd_precomp --epochs 30 --early_stop 5 --seeds 1,2,3 --embed_size 128

For every seed it trains the global and local subnetworks with the paper's setting, again without
auxiliary terms (alpha = beta = 0), with the triplet (VSE++) loss, and for the instance-level protocol with
the MSB and the triplet loss; it keeps each freshly initialised model and evaluates on test every group of
rows and their fusion (w tuned on dev). It writes results/<data_name>/table.md and table.json (label-level:
untrained, trained, no auxiliary terms, triplet) and table_instance.md / .json (the same checkpoints under
the instance protocol, plus the instance-trained rows, beside published results), mean and standard
deviation over seeds, and dev_curves.png. --rows picks a subset of the row groups. Other flags
(--embed_size, --learning_rate, ...) go to both training scripts. A rerun skips every finished stage and
resumes an interrupted training; a stage whose data files or checkpoints changed runs again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from runtime import allocator, threads

threads.passive_wait_policy()  # before torch is imported
allocator.keep_freed_memory()  # each step reuses its temporaries instead of page-faulting them in

import dev_curves  # noqa: E402
import evaluate  # noqa: E402
import trainer  # noqa: E402
from model_factory import untrained_model  # noqa: E402
from options import SUBNETWORK_DEFAULTS, changed_options, parse_options  # noqa: E402
from published import published_rows  # noqa: E402
from runtime import provenance  # noqa: E402
from runtime import run_folder  # noqa: E402
from runtime.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from runtime.errors import InputError, report_errors  # noqa: E402
from runtime.files import atomic_write_bytes, check_writable  # noqa: E402
from runtime.layout import COARSE_FOLDER, FINE_FOLDER  # noqa: E402
from runtime.run_log import PERFORMANCE_LOG, read_performance  # noqa: E402
from vocab import build_vocab, load_vocab, save_vocab, vocab_file  # noqa: E402

AUX_WEIGHTS = {kind: tuple(dict(d["weights"])) for kind, d in SUBNETWORK_DEFAULTS.items()}  # the flag names
# training variant -> (what it is, flags after the pass-through ones; noaux's come from AUX_WEIGHTS)
VARIANTS = {
    "full": ("", ()),
    "noaux": ("without auxiliary terms", ()),
    "triplet": ("with the triplet loss", ("--loss", "triplet")),
    "instance": ("instance-trained", ("--relevance", "instance")),
    "instance_triplet": ("instance-trained, triplet loss", ("--relevance", "instance", "--loss", "triplet")),
}
UNTRAINED = "untrained.pth.tar"
PROTOCOLS = ("label", "instance")
# row group (--rows) -> (training variant, checkpoint file, protocols it is evaluated under, row-name suffix)
GROUPS = {
    "untrained": ("full", UNTRAINED, PROTOCOLS, "untrained"),
    "trained": ("full", trainer.BEST, PROTOCOLS, ""),
    "noaux": ("noaux", trainer.BEST, PROTOCOLS, "no auxiliary terms"),
    "triplet": ("triplet", trainer.BEST, PROTOCOLS, "triplet loss"),
    "instance": ("instance", trainer.BEST, ("instance",), "instance-trained"),
    "instance_triplet": ("instance_triplet", trainer.BEST, ("instance",), "instance-trained, triplet loss"),
}
# row groups that --ablation_seeds may run with fewer seeds than the paper's rows (untrained, trained)
ABLATIONS = ("noaux", "triplet", "instance", "instance_triplet")
SUBNETWORK_ROWS = ("global", "local", "fused")
# table columns: (direction, metric); "mean" is the mean of i2t and t2i mAP, "mR" the mean of the six R@K
METRICS = {
    "label": (("i2t", "mAP"), ("t2i", "mAP"), ("mean", "mAP"), ("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"),
              ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10")),
    "instance": (("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"), ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10"),
                 ("mR", ""), ("i2t", "mAP"), ("t2i", "mAP")),
}
# Flags reproduce.py sets itself for every run; they may not be passed through.
OWN_FLAGS = ("--data_path", "--seed", "--num_epochs", "--logger_name", "--model_name", "--resume", "--overwrite",
             "--loss", "--relevance")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """reproduce.py's own flags, and the rest (passed through to the training scripts)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --seed must not be read as --seeds
    p.add_argument("--global_data_path", default=f"./data/{COARSE_FOLDER}")
    p.add_argument("--local_data_path", default=f"./data/{FINE_FOLDER}")
    p.add_argument("--data_name", default="corel5k_precomp")
    p.add_argument("--vocab_path", default="./vocab", help="built from train and dev captions when missing")
    p.add_argument("--epochs", type=int, default=10, help="training epochs of every subnetwork (the most, with "
                   "--early_stop)")
    p.add_argument("--early_stop", type=int, default=0, metavar="P",
                   help="stop a training when its dev rsum has not improved for P epochs (0: off)")
    p.add_argument("--rows", default=",".join(GROUPS),
                   help=f"comma-separated row groups to run and tabulate, of {', '.join(GROUPS)}")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    p.add_argument("--ablation_seeds", help=f"seeds of the ablation row groups ({', '.join(ABLATIONS)}), "
                   "when fewer runs must fit the time at hand (default: --seeds)")
    p.add_argument("--cnn_dim", type=int, help="CNN feature width (default: summary.json of the data, else 4096)")
    p.add_argument("--bovw_dim", type=int, help="BoVW feature width (default: summary.json of the data, else 500)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--results_dir", default="./results", help="tables go to <results_dir>/<data_name>/")
    p.add_argument("--runs_dir", default="./runs", help="checkpoints and logs go to <runs_dir>/<data_name>/")
    args, passthrough = p.parse_known_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.ablation_seeds = [int(s) for s in args.ablation_seeds.split(",")] if args.ablation_seeds else args.seeds
    except ValueError as err:
        p.error(f"--seeds and --ablation_seeds must be comma-separated integers ({err})")
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.early_stop < 0:
        p.error("--early_stop must be 0 (off) or a number of epochs")
    args.rows = [group for group in args.rows.split(",") if group]
    unknown = [group for group in args.rows if group not in GROUPS]
    if unknown or not args.rows:
        p.error(f"--rows: unknown group {unknown[0] if unknown else '(none)'}; choose from {', '.join(GROUPS)}")
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
        trained = {GROUPS[g][0] for g in args.rows if GROUPS[g][1] == trainer.BEST}
        self.variants = [v for v in VARIANTS if v in trained]
        self.evaluations = [(protocol, g) for protocol in PROTOCOLS for g in args.rows if protocol in GROUPS[g][2]]
        self.stage = 0
        self.stages = (sum(len(self.variant_seeds(v)) for v in self.variants) * len(AUX_WEIGHTS) +
                       sum(len(self.group_seeds(g)) for _, g in self.evaluations))

    def group_seeds(self, group: str) -> list[int]:
        """The seeds a row group is run and averaged over."""
        return self.args.ablation_seeds if group in ABLATIONS else self.args.seeds

    def variant_seeds(self, variant: str) -> list[int]:
        """The seeds a training variant runs with: those of every requested row group that uses it."""
        seeds = [s for g in self.args.rows if GROUPS[g][0] == variant for s in self.group_seeds(g)]
        return list(dict.fromkeys(seeds))

    def data_path(self, kind: str) -> str:
        return self.args.global_data_path if kind == "global" else self.args.local_data_path

    def run_folder(self, variant: str, kind: str, seed: int) -> str:
        return os.path.join(self.args.runs_dir, self.args.data_name, variant, kind, f"seed{seed}")

    def train_argv(self, variant: str, kind: str, seed: int) -> list[str]:
        folder = self.run_folder(variant, kind, seed)
        argv = ["--data_path", self.data_path(kind), "--data_name", self.args.data_name, "--vocab_path",
                self.args.vocab_path, "--num_epochs", str(self.args.epochs), "--seed", str(seed), "--device",
                self.args.device, "--logger_name", folder, "--model_name", folder, "--early_stop",
                str(self.args.early_stop), *self.dims, *flags_for(kind, self.passthrough), *VARIANTS[variant][1]]
        if variant == "noaux":  # after the pass-through flags, so these win
            argv += [token for name in AUX_WEIGHTS[kind] for token in (f"--{name}", "0")]
        return argv

    def announce(self, seed: int, what: str) -> None:
        self.stage += 1
        print(f"\n== [{self.stage}/{self.stages}] seed {seed}: {what}", flush=True)

    def train(self, variant: str, kind: str, seed: int) -> None:
        """Train one run to --epochs or its early stop (resuming it if interrupted) unless it is finished."""
        name = f"{kind} {VARIANTS[variant][0]}".strip()
        self.announce(seed, f"training {name}, {self.args.epochs} epochs")
        argv = self.train_argv(variant, kind, seed)
        opt = parse_options(kind, argv)
        folder = opt["model_name"]
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

    def untrained(self, seed: int) -> None:
        """The freshly initialised subnetworks of the full variant, saved once (again when the data changed)."""
        for kind in AUX_WEIGHTS:
            opt = parse_options(kind, self.train_argv("full", kind, seed))
            path = os.path.join(opt["model_name"], UNTRAINED)
            if not os.path.isfile(path) or data_change(path, opt):
                save_untrained(kind, opt, path)

    def evaluate(self, protocol: str, name: str, seed: int) -> dict:
        """evaluate.py on both subnetworks of one row group under a protocol, unless its JSON is newer than
        the checkpoints (label: seed<s>/<group>.json, instance: seed<s>/instance/<group>.json)."""
        self.announce(seed, f"evaluating {name} subnetworks and their fusion, {protocol}-level")
        variant, filename = GROUPS[name][:2]
        ckpts = {kind: os.path.join(self.run_folder(variant, kind, seed), filename) for kind in AUX_WEIGHTS}
        stage = name if protocol == "label" else f"instance/{name}"
        output = os.path.join(self.results, f"seed{seed}", f"{stage}.json")
        earlier = self.earlier_evaluation(output, ckpts)
        if earlier is not None:
            print(f"evaluated earlier ({output}), skipped", flush=True)
            return earlier
        start = time.time()
        summary = evaluate.run(evaluate.EvaluationConfig(
            global_ckpt=ckpts["global"], local_ckpt=ckpts["local"], tune_fusion=True,
            global_data_path=self.args.global_data_path, local_data_path=self.args.local_data_path,
            device=self.args.device, output=output, relevance=protocol))
        self.timings.record(f"seed{seed}/evaluate/{stage}", time.time() - start)
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

    def run(self) -> dict[int, dict[tuple[str, str], dict]]:
        """Every stage, seed by seed; returns the evaluation summaries by seed and (protocol, group)."""
        evaluations = {}
        for seed in dict.fromkeys(self.args.seeds + self.args.ablation_seeds):
            if "untrained" in self.args.rows and seed in self.args.seeds:
                self.untrained(seed)
            for variant in self.variants:
                for kind in AUX_WEIGHTS:
                    if seed in self.variant_seeds(variant):
                        self.train(variant, kind, seed)
            evaluations[seed] = {key: self.evaluate(*key, seed) for key in self.evaluations
                                 if seed in self.group_seeds(key[1])}
        return evaluations


def save_untrained(kind: str, opt: dict, path: str) -> None:
    """Checkpoint of the freshly initialised subnetwork, as training starts it."""
    vocab = load_vocab(vocab_file(opt["vocab_path"], opt["data_name"]))
    model = untrained_model(kind, opt, len(vocab))
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
    patience_over = opt["early_stop"] > 0 and ckpt["epoch"] - ckpt.get("best_epoch", ckpt["epoch"]) >= opt["early_stop"]
    return (ckpt["epoch"] == opt["num_epochs"] or patience_over) and ckpt.get("evaluated", True)


def data_change(path: str, opt: dict) -> str:
    """The train and validation files that differ from those a checkpoint records; '' when none (or no record)."""
    recorded = load_checkpoint(path, opt["kind"]).get("data")
    if not isinstance(recorded, dict):
        return ""
    current = provenance.data_fingerprint(os.path.join(opt["data_path"], opt["data_name"]))
    return ", ".join(name for split in ("train", opt["val_split"])
                     for name in provenance.changed_files(recorded, current, split))


def dev_curve(folder: str) -> dict[int, float]:
    """Dev rsum by epoch from a run's performance.log (its selection score: i2t + t2i mAP, or the sum of R@K
    when instance-trained); a re-evaluated epoch keeps its last line."""
    return {record["epoch"]: record["rsum"] for record in read_performance(os.path.join(folder, PERFORMANCE_LOG))}


def still_rising(curve: dict[int, float]) -> bool:
    """The last epoch scored better on dev than every earlier one (so more epochs might help)."""
    last = max(curve)
    return curve[last] > max(value for epoch, value in curve.items() if epoch != last)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value) of per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def column(direction: str, metric: str) -> str:
    """Name of a table column: 'i2t mAP', 'mean mAP', 'mR', ..."""
    return "mR" if direction == "mR" else f"{direction} {metric}"


def metric_value(row: dict, direction: str, metric: str) -> float:
    if direction == "mR":
        return row["mR"]
    return row["mean_mAP"] if direction == "mean" else row[direction][metric]


def row_name(row: str, suffix: str) -> str:
    """'global, triplet loss', ...; the paper's fused row keeps its name 'fused (w tuned on dev)'."""
    if not suffix:
        return "fused (w tuned on dev)" if row == "fused" else row
    return f"{row}, {suffix}"


def run_stop(folder: str) -> tuple[int, bool]:
    """Best epoch and whether the run stopped early, from its last checkpoint (older ones: from its log)."""
    ckpt = load_checkpoint(os.path.join(folder, trainer.LAST))
    if "best_epoch" in ckpt:
        return ckpt["best_epoch"], ckpt.get("stop_reason") == "early_stop"
    curve = {epoch: value for epoch, value in dev_curve(folder).items() if epoch > 0}
    return max(curve, key=lambda epoch: (curve[epoch], -epoch)), False


def convergence(repro: Reproduction, variant: str, kinds: list[str], seeds: list[int]) -> dict[str, str]:
    """Dev trends of the runs behind a row: seeds still rising at the last epoch (per subnetwork), the mean
    best epoch and how many runs stopped early (over every run behind the row)."""
    rising, stops = [], []
    for kind in kinds:
        folders = [repro.run_folder(variant, kind, s) for s in seeds]
        count = sum(still_rising(dev_curve(folder)) for folder in folders)
        rising.append(f"{kind} {count}/{len(seeds)}" if len(kinds) > 1 else f"{count}/{len(seeds)}")
        stops += [run_stop(folder) for folder in folders]
    return {"dev_rising_at_last_epoch": ", ".join(rising),
            "mean_best_epoch": f"{statistics.fmean(epoch for epoch, _ in stops):.1f}",
            "stopped_early": f"{sum(early for _, early in stops)}/{len(stops)}"}


def build_table(repro: Reproduction, evaluations: dict[int, dict[tuple[str, str], dict]], protocol: str) -> dict:
    """Mean and std over seeds of every row and metric of one protocol, with fusion weights, dev trends,
    convergence and wall times."""
    rows = {}
    groups = [g for p, g in repro.evaluations if p == protocol]
    for group in groups:
        variant, filename, _, suffix = GROUPS[group]
        seeds = repro.group_seeds(group)
        for row in SUBNETWORK_ROWS:
            per_seed = [evaluations[s][protocol, group]["rows"][row] for s in seeds]
            label = row_name(row, suffix)
            rows[label] = {column(d, m): mean_std([metric_value(r, d, m) for r in per_seed])
                           for d, m in METRICS[protocol]}
            trained = filename == trainer.BEST
            kinds = list(AUX_WEIGHTS) if row == "fused" else [row]
            rows[label].update(convergence(repro, variant, kinds, seeds) if trained else
                               dict.fromkeys(("dev_rising_at_last_epoch", "mean_best_epoch", "stopped_early"), "-"))
            rows[label]["seeds"] = seeds
    first = evaluations[repro.group_seeds(groups[0])[0]][protocol, groups[0]]
    wall = repro.timings.seconds
    table = {"data_name": repro.args.data_name, "protocol": protocol, "split": first["split"],
             "images": first["images"], "captions_per_image": first["captions_per_image"],
             "seeds": repro.args.seeds, "ablation_seeds": repro.args.ablation_seeds,
             "epochs": repro.args.epochs, "early_stop": repro.args.early_stop,
             "training_flags": repro.dims + repro.passthrough,
             "fusion_weights": {group: {s: evaluations[s][protocol, group]["fusion_weight"]
                                        for s in repro.group_seeds(group)} for group in groups},
             "rows": rows, "wall_time_s": wall, "total_wall_time_s": round(sum(wall.values()), 1)}
    if protocol == "instance":
        table["duplicate_captions"] = first.get("duplicate_captions")
        table["published"] = published_rows(repro.args.data_name)
    return table


def format_markdown(table: dict) -> str:
    """table.md / table_instance.md: one line per row, mean ± std over seeds; published rows beside."""
    seeds = ", ".join(map(str, table["seeds"]))
    metrics = METRICS[table["protocol"]]
    extra = ["dev rsum rising at last epoch", "mean best epoch", "stopped early", "seeds"]
    head = ["model"] + [column(d, m) for d, m in metrics] + extra
    relevance = ("relevant = the caption's own image (instance level)" if table["protocol"] == "instance"
                 else "relevant = shared label (label level)")
    stop = f", early stop after {table['early_stop']} epochs without a better dev rsum" if table["early_stop"] else ""
    lines = [f"# M2HSE on {table['data_name']}: {table['split']} split, {table['protocol']}-level, mean ± std over "
             f"seeds {seeds}", "",
             f"{table['images']} images with {table['captions_per_image']} captions each; {relevance}.",
             f"At most {table['epochs']} epochs per subnetwork{stop}; training flags: "
             f"{' '.join(table['training_flags']) or 'defaults'}.",
             "mAP@all and R@K in percent; std is the sample standard deviation over seeds. Fusion weight w tuned on "
             "dev per seed: " + "; ".join(f"{name} " + ", ".join(f"{w:.2f}" for w in ws.values())
                                          for name, ws in table["fusion_weights"].items()) + ".",
             "Dev columns: seeds whose dev rsum at the last epoch beat every earlier epoch; the mean best epoch and "
             "the runs stopped early (out of all runs behind the row).", *fewer_seeds_note(table),
             f"Wall time of all stages: {table['total_wall_time_s'] / 60:.1f} min.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table["rows"].items():
        cells = [mean_cell(row[column(d, m)]) for d, m in metrics]
        lines.append("| " + " | ".join([label, *cells, row["dev_rising_at_last_epoch"], row["mean_best_epoch"],
                                        row["stopped_early"], ", ".join(map(str, row["seeds"]))]) + " |")
    return "\n".join(lines + published_markdown(table)) + "\n"


def mean_cell(stat: dict) -> str:
    """mean ± std, or the mean alone for a row of one seed (no spread to show)."""
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if len(stat["values"]) > 1 else "")


def fewer_seeds_note(table: dict) -> list[str]:
    """A line naming the rows run with --ablation_seeds when those differ from --seeds."""
    if table.get("ablation_seeds", table["seeds"]) == table["seeds"]:
        return []
    fewer = [label for label, row in table["rows"].items() if row["seeds"] != table["seeds"]]
    return [f"To fit the time at hand, {len(fewer)} ablation rows ran with seeds "
            f"{', '.join(map(str, table['ablation_seeds']))} only (--ablation_seeds): {'; '.join(fewer)}."]


def published_markdown(table: dict) -> list[str]:
    """The published instance-level rows (not run here), and the duplicate captions of the split."""
    lines = []
    twins = table.get("duplicate_captions")
    if twins:
        lines += ["", f"{twins['captions_with_a_twin_of_another_image']} test captions have an identical twin "
                      f"describing another image ({twins['distinct_strings']} distinct strings); they are kept, and "
                      "a twin counts as not relevant."]
    if table.get("published"):
        lines += ["", "Published instance-level results on the same test split (published, not run here):", "",
                  "| method (features) | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR | source |",
                  "|" + "---|" * 9]
        for r in table["published"]:
            recalls = [f"{v:.2f}" for v in (*r["i2t"], *r["t2i"])] if r["i2t"] else ["-"] * 6
            features = f" ({r['features']})" if r["features"] else ""
            lines.append("| " + " | ".join([f"{r['method']}{features}, published", *recalls, f"{r['mR']:.2f}",
                                            r["source"]]) + " |")
    return lines


@report_errors
def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Every stage, then both tables and the dev curves; returns the tables by protocol."""
    args, passthrough = parse_args(argv)
    check_writable(args.results_dir, "--results_dir")
    check_writable(args.runs_dir, "--runs_dir")
    ensure_vocab(args)
    for kind in AUX_WEIGHTS:  # bad pass-through flags stop here, before anything trains
        parse_options(kind, flags_for(kind, passthrough))
    repro = Reproduction(args, passthrough)
    evaluations = repro.run()
    tables = {}
    for protocol in PROTOCOLS:
        if not any(p == protocol for p, _ in repro.evaluations):
            continue
        tables[protocol] = build_table(repro, evaluations, protocol)
        name = "table" if protocol == "label" else "table_instance"
        write_json(os.path.join(repro.results, f"{name}.json"), tables[protocol])
        markdown = format_markdown(tables[protocol])
        atomic_write_bytes(os.path.join(repro.results, f"{name}.md"), markdown.encode("utf-8"))
        print("\n" + markdown + f"\nwrote {repro.results}/{name}.md and {name}.json")
    if repro.variants:
        runs = {f"{variant} {kind}": [os.path.join(repro.run_folder(variant, kind, s), PERFORMANCE_LOG)
                                      for s in repro.variant_seeds(variant)]
                for variant in repro.variants for kind in AUX_WEIGHTS}
        figure = os.path.join(repro.results, "dev_curves.png")
        dev_curves.draw_dev_curves(runs, figure, f"{args.data_name}: dev curves, mean over seeds")
        print(f"wrote {figure}")
    return tables


if __name__ == "__main__":
    main()
