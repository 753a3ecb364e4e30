"""Where the time of one training step and of one dev evaluation goes, part by part (CPU).

    python -m benchmarks.profile_step                   RSICD sizes, both subnetworks, 1 thread
    python -m benchmarks.profile_step --shape paper     the paper's Corel 5K sizes
    python -m benchmarks.profile_step --kinds local --steps 10 --threads 2
    python -m benchmarks.profile_step --compare         also time the previous implementation
    python -m benchmarks.profile_step --interleave --steps 30   step / floor / epoch ratios, steps alternating

--compare alternates rounds of the current code and the previous one (tests/reference_previous.py:
the local attention through autograd ops, the GRU on packed sequences, torch's default Adam; and glibc's
default memory thresholds) in the same process and prints before / after medians.

Each part is timed by wall clock and by this process's CPU time (the stable figure on a shared
machine); the table gives medians over the timed steps. The backward pass is split into the part
through the similarities and the loss and the part through the encoders. "encoder floor" is a step
with the similarities and the loss removed (the encoders' outputs summed instead): the step's cost
with free attention. Like the training scripts, the tool lets idle OpenMP threads sleep
(OMP_WAIT_POLICY=PASSIVE, unless the environment sets a policy).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

from runtime import threads

threads.passive_wait_policy()  # as the training scripts do, before torch loads

import torch  # noqa: E402
from torch import nn  # noqa: E402

import trainer  # noqa: E402
from benchmarks.shapes import PAPER, RSICD, Shape, batch_of, in_memory_split  # noqa: E402
from metrics import retrieval_metrics  # noqa: E402
from model_factory import build_model  # noqa: E402
from runtime import allocator  # noqa: E402
from scoring import encode_split  # noqa: E402
from subnetwork import SIMILARITIES  # noqa: E402

SHAPES = {"rsicd": RSICD, "paper": PAPER}
ROWS = ("whole step", "batch assembly (collate)", "forward: encoders", "  image encoders (FC + L2)",
        "  word embedding", "  BiGRU (+ direction mean, L2)", "similarity S_P", "auxiliary S_A1, S_A2",
        "MSB loss (3 terms)", "backward: similarities + loss", "backward: encoders", "grad clip + Adam",
        "encoder floor (step without attention/loss)", "encode dev split", "score all pairs",
        "mAP / recall (metrics)", "whole evaluation")


class Clock:
    """Wall and process-CPU seconds per label, accumulated within a step and kept per step."""

    def __init__(self):
        self.now: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.steps: list[dict[str, list[float]]] = []

    @contextmanager
    def part(self, label: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.now[label][0] += time.perf_counter() - wall
            self.now[label][1] += time.process_time() - cpu

    def end_step(self) -> None:
        self.steps.append(dict(self.now))
        self.now.clear()

    def medians(self, skip: int = 1) -> dict[str, tuple[float, float]]:
        """(wall, cpu) median seconds of each label over the steps after the first `skip` (warm-up)."""
        kept = self.steps[skip:] or self.steps
        return {label: (statistics.median(s.get(label, (0.0, 0.0))[0] for s in kept),
                        statistics.median(s.get(label, (0.0, 0.0))[1] for s in kept))
                for label in kept[0]}

    def time_modules(self, modules: dict[str, nn.Module]) -> list:
        """Time each module's forward under its label, through hooks; returns the hook handles."""
        handles = []
        for label, module in modules.items():
            started: list[tuple[float, float]] = []

            def start(m, args, started=started):
                started.append((time.perf_counter(), time.process_time()))

            def stop(m, args, out, label=label, started=started):
                wall, cpu = started.pop()
                self.now[label][0] += time.perf_counter() - wall
                self.now[label][1] += time.process_time() - cpu
            handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
        return handles


def encoder_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The modules timed inside the forward pass (a module's time includes its children's)."""
    return {"image encoders (FC + L2)": model.img_cnn, "image encoders (FC + L2) ": model.img_bovw,
            "word embedding": model.txt_cnn.embed, "word embedding ": model.txt_bovw.embed,
            "text encoders (all)": model.txt_cnn, "text encoders (all) ": model.txt_bovw}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, clock: Clock,
                  floor: bool = False) -> None:
    """One step as trainer.Trainer.train_step takes it, each part under its clock label."""
    cnn, bovw, captions, lengths, labels, _ = batch
    with clock.part("forward: encoders"):
        encoded = model.encode(cnn, bovw, captions, lengths)
    outputs = [value for value in encoded.values() if value.is_floating_point()]
    if floor:
        loss = sum(value.sum() for value in outputs)
    else:
        sims = {}
        for name in SIMILARITIES:
            with clock.part("similarity S_P" if name == "P" else "auxiliary S_A1, S_A2"):
                sims[name] = model.similarity(name, encoded)
        with clock.part("MSB loss (3 terms)"):
            loss = model.loss_terms(sims, labels)["loss"]
    optimizer.zero_grad(set_to_none=True)
    with clock.part("backward: similarities + loss"):
        grads = torch.autograd.grad(loss, outputs)
    with clock.part("backward: encoders"):
        torch.autograd.backward(outputs, grads)
    with clock.part("grad clip + Adam"):
        nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
    clock.end_step()


class StepRunner:
    """Timed training steps of one fresh model at the shape's sizes, one batch a call (its collate included)."""

    def __init__(self, kind: str, shape: Shape, steps: int, floor: bool = False, model_cls=None):
        torch.manual_seed(0)
        self.model = (model_cls or (lambda o, v: build_model(kind, o, v)))(shape.opt(kind), shape.vocab_size)
        self.optimizer = trainer.adam(self.model.parameters(), 2e-4)
        self.train = in_memory_split(shape, kind, max(1, (steps + 1) * shape.batch_size // shape.captions_per_image)
                                     + 1)
        self.order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(0)).tolist()
        self.batch_size, self.floor, self.steps_done, self.clock = shape.batch_size, floor, 0, Clock()
        self.handles = self.clock.time_modules(encoder_parts(self.model))
        self.model.train()

    def step(self) -> None:
        first = self.steps_done * self.batch_size
        with self.clock.part("batch assembly (collate)"):
            batch = batch_of(self.train, self.order[first:first + self.batch_size])
        with self.clock.part("whole step"):
            training_step(self.model, self.optimizer, batch, self.clock, self.floor)
        self.steps_done += 1

    def parts(self) -> dict:
        """Median seconds per part after the first (warm-up) step; the timing hooks are removed."""
        for handle in self.handles:
            handle.remove()
        parts = merge_twins(self.clock.medians())
        text, embedding = parts.pop("text encoders (all)"), parts["word embedding"]
        parts["BiGRU (+ direction mean, L2)"] = (text[0] - embedding[0], text[1] - embedding[1])
        return {label: parts[label.strip()] for label in ROWS if label.strip() in parts}


def profile_training(kind: str, shape: Shape, steps: int, floor: bool = False, model_cls=None) -> dict:
    """Median seconds per part of `steps` training steps (after one warm-up) at the shape's sizes."""
    runner = StepRunner(kind, shape, steps, floor, model_cls)
    for _ in range(steps + 1):
        runner.step()
    return runner.parts()


def merge_twins(parts: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Add the CNN- and BoVW-branch timings kept under the same label (the second with a trailing space)."""
    merged: dict[str, tuple[float, float]] = {}
    for label, (wall, cpu) in parts.items():
        key = label.rstrip()
        old = merged.get(key, (0.0, 0.0))
        merged[key] = (old[0] + wall, old[1] + cpu)
    return merged


def profile_evaluation(kind: str, shape: Shape, model: nn.Module | None = None) -> dict:
    """Seconds of one dev evaluation (scoring.validate, split in its stages) at the shape's sizes."""
    torch.manual_seed(0)
    model = model or build_model(kind, shape.opt(kind), shape.vocab_size)
    dev = in_memory_split(shape, kind, shape.dev_images, seed=1)
    clock = Clock()
    with clock.part("encode dev split"):
        images, texts, lengths = encode_split(model, dev, shape.batch_size, torch.device("cpu"))
    with clock.part("score all pairs"), torch.no_grad():
        sims = model.primary_similarity(images, texts, lengths).double().numpy()
    with clock.part("mAP / recall (metrics)"):
        retrieval_metrics(sims, dev.labels.numpy(), dev.caption_labels.numpy())
    clock.end_step()
    parts = clock.medians(skip=0)
    parts["whole evaluation"] = tuple(sum(p[i] for p in parts.values()) for i in (0, 1))
    return parts


@contextmanager
def before_speed_work():
    """The code paths before the CPU speed work (tests/reference_previous.py) and glibc's memory thresholds."""
    from tests.reference_previous import previous_implementation
    allocator.keep_freed_memory(False)
    try:
        with previous_implementation():
            yield
    finally:
        allocator.keep_freed_memory()


def compare(kind: str, shape: Shape, steps: int, rounds: int, evaluate: bool) -> None:
    """Before / after CPU medians of the step (alternating rounds) and of one dev evaluation."""
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(rounds):
        with before_speed_work():
            runs["before"].append(profile_training(kind, shape, steps))
        runs["after"].append(profile_training(kind, shape, steps))
    if evaluate:
        with before_speed_work():
            runs["before"][0].update(profile_evaluation(kind, shape))
        runs["after"][0].update(profile_evaluation(kind, shape))
    floors = {"before": [], "after": []}
    for _ in range(rounds):
        with before_speed_work():
            floors["before"].append(profile_training(kind, shape, steps, floor=True)["whole step"][1])
        floors["after"].append(profile_training(kind, shape, steps, floor=True)["whole step"][1])
    print(f"\n{kind} before / after, CPU ms (median of {rounds} rounds of {steps} steps)")
    print(f"  {'part':<44} {'before':>9} {'after':>9} {'ratio':>6}")
    medians = {}
    for label in runs["after"][0]:
        before = statistics.median(r[label][1] for r in runs["before"] if label in r)
        after = statistics.median(r[label][1] for r in runs["after"] if label in r)
        medians[label] = {"before": before, "after": after}
        print(f"  {label:<44} {1e3 * before:9.1f} {1e3 * after:9.1f} {before / max(after, 1e-9):6.2f}")
    for when in ("before", "after"):
        step = medians["whole step"][when]
        epoch = shape.train_steps() * (step + medians["batch assembly (collate)"][when])
        evaluation = (f", dev evaluation {100 * medians['whole evaluation'][when] / epoch:.1f}% of it"
                      if "whole evaluation" in medians else "")
        print(f"  {when}: step / encoder floor {step / statistics.median(floors[when]):.2f}x "
              f"(floor {1e3 * statistics.median(floors[when]):.1f} ms); epoch of {shape.train_steps()} "
              f"steps {epoch:.0f} CPU s{evaluation}")


def interleaved(kinds: list[str], shape: Shape, steps: int) -> None:
    """Step, encoder floor and epoch of each kind, single steps of all of them alternating: a step and its floor
    run the same batch within a fraction of a second of each other, so their ratio is robust to this machine's
    drift. step / floor compares like with like (neither includes batch assembly); the epoch adds it."""
    # one thread: CPU time, stable on a shared machine; several: wall time, since CPU time adds the threads up
    clock, unit = (1, "CPU") if torch.get_num_threads() == 1 else (0, "wall")
    runners = {(kind, floor): StepRunner(kind, shape, steps, floor) for kind in kinds for floor in (False, True)}
    for _ in range(steps + 1):
        for runner in runners.values():
            runner.step()
    print(f"\ninterleaved: medians of {steps} alternating steps, {threads.describe()}, {unit} ms")
    epochs = {}
    for kind in kinds:
        step_times, floor_times = ([timed["whole step"][clock] for timed in runners[kind, floor].clock.steps[1:]]
                                   for floor in (False, True))
        ratio = statistics.median(step / floor for step, floor in zip(step_times, floor_times))
        step, floor = statistics.median(step_times), statistics.median(floor_times)
        collate = runners[kind, False].parts()["batch assembly (collate)"][clock]
        epochs[kind] = shape.train_steps() * (step + collate)
        print(f"  {kind}: step {1e3 * step:.1f}, encoder floor {1e3 * floor:.1f}, step / floor {ratio:.2f}x (median "
              f"of the {len(step_times)} steps' ratios); batch assembly {1e3 * collate:.1f}, epoch {epochs[kind]:.0f} "
              f"{unit} s")
    if {"global", "local"} <= set(epochs):
        print(f"  local epoch / global epoch: {epochs['local'] / epochs['global']:.2f}x")


def print_table(title: str, parts: dict[str, tuple[float, float]], whole: str) -> None:
    total_cpu = parts[whole][1] or 1e-12
    print(f"\n{title}\n  {'part':<44} {'wall ms':>9} {'CPU ms':>9} {'% CPU':>6}")
    for label, (wall, cpu) in parts.items():
        print(f"  {label:<44} {1e3 * wall:9.1f} {1e3 * cpu:9.1f} {100 * cpu / total_cpu:6.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="rsicd")
    p.add_argument("--kinds", default="global,local")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-eval", action="store_true", help="skip the dev evaluation")
    p.add_argument("--compare", action="store_true", help="before / after table against the previous code")
    p.add_argument("--interleave", action="store_true",
                   help="only the step / floor / epoch figures, single steps of the kinds and floors alternating")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of --compare")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as the training scripts do
    shape = SHAPES[args.shape]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; {shape}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.interleave:
        interleaved(args.kinds.split(","), shape, args.steps)
        return
    for kind in args.kinds.split(","):
        if args.compare:
            compare(kind, shape, args.steps, args.rounds, not args.no_eval)
            continue
        parts = profile_training(kind, shape, args.steps)
        floor = profile_training(kind, shape, args.steps, floor=True)["whole step"]
        parts["encoder floor (step without attention/loss)"] = floor
        print_table(f"{kind} training step, batch {shape.batch_size}, medians of {args.steps} steps", parts,
                    "whole step")
        step_ratio = parts["whole step"][1] / floor[1]
        epoch = shape.train_steps() * (parts["whole step"][1] + parts["batch assembly (collate)"][1])
        print(f"  step / encoder floor (CPU): {step_ratio:.2f}x; epoch of {shape.train_steps()} steps: "
              f"{epoch:.0f} CPU s")
        if not args.no_eval:
            evaluation = profile_evaluation(kind, shape)
            print_table(f"{kind} dev evaluation, {shape.dev_images} images x "
                        f"{shape.dev_images * shape.captions_per_image} captions", evaluation, "whole evaluation")
            print(f"  evaluation / epoch (CPU): {100 * evaluation['whole evaluation'][1] / epoch:.1f}%")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
