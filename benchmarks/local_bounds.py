"""What bounds the local training step at RSICD sizes: its raw-score matmuls and its fused attention kernel
alone, against its similarities + MSB loss (forward and backward) and its encoder floor.

    python -m benchmarks.local_bounds [--threads 2] [--rounds 6]

The step, its floor and its similarities + loss come from benchmarks.profile_step on SYNTHETIC RSICD-shaped
batches; the matmuls (a[b, k, a, l] = <block, word> and its two gradients) and the paired kernel run on the
inputs the model's own attention calls receive in one step. All parts alternate over the rounds, and each training
step runs right after its floor step on the same batch (ratios robust to this machine's drift), with the scripts'
wait policy; wall ms per training step, medians. The
matmuls and the kernel are work the similarities cannot skip; the rest of their time is small tensor ops,
autograd, OpenMP wake-ups and the loss.
"""
from __future__ import annotations

import argparse
import statistics
import time

from runtime import threads

threads.passive_wait_policy()  # as the training scripts do, before torch loads

import torch  # noqa: E402

import attention_kernel  # noqa: E402
import model_local  # noqa: E402
from benchmarks.profile_step import StepRunner  # noqa: E402
from benchmarks.shapes import RSICD, batch_of, in_memory_split  # noqa: E402
from model_factory import build_model  # noqa: E402
from runtime import allocator  # noqa: E402

SIMILARITY_PARTS = ("similarity S_P", "auxiliary S_A1, S_A2", "MSB loss (3 terms)", "backward: similarities + loss")


def paired_calls() -> tuple[list, list]:
    """The raw-score products (rows, cols) and the paired-kernel inputs of one training step's similarities, as
    csrc/paired_groups.cpp makes them from the model's calls (its caption groups; one slice of rows at these
    sizes)."""
    kernel = attention_kernel.load()
    calls, grouped_forward = [], kernel.grouped_forward

    def record(*args):
        calls.append(args)
        return grouped_forward(*args)

    torch.manual_seed(0)
    model = build_model("local", RSICD.opt("local"), RSICD.vocab_size)
    split = in_memory_split(RSICD, "local", RSICD.batch_size // RSICD.captions_per_image + 1)
    cnn, bovw, captions, lengths, _, _ = batch_of(split, list(range(RSICD.batch_size)))
    kernel.grouped_forward = record
    try:
        with torch.no_grad():
            model.similarities(model.encode(cnn, bovw, captions, lengths))
    finally:
        kernel.grouped_forward = grouped_forward
    products, kernel_inputs = [], []
    for rows, cols, row_mask, col_lengths, order, bounds, *_ in calls:
        index, weight = kernel.column_packing(col_lengths, order, bounds, cols.size(1))
        weight = weight.to(rows.dtype)
        packed = cols.reshape(-1, cols.size(-1)).index_select(0, index) * weight[:, None]
        offset = 0
        for first, end, length in zip(bounds[0::4], bounds[1::4], bounds[2::4]):  # (rows a slice: all of them here)
            span = slice(offset, offset + (end - first) * length)
            vectors, offset = packed[span].view(length, end - first, -1), span.stop
            products.append((rows, vectors))
            raw = model_local._raw_scores(rows, vectors).transpose(2, 3)  # position-major, as the kernel gets it
            grams = model_local.gram_matrices(rows), model_local.gram_matrices(vectors.transpose(0, 1))
            kernel_inputs.append((raw, *grams, rows.pow(2).sum(-1), vectors.pow(2).sum(-1).T, row_mask.to(rows.dtype),
                                  weight[span].view(length, end - first).T))
    return products, kernel_inputs


def matmuls(products) -> None:
    """The raw scores of every product and their two gradients (as the Function's backward computes them)."""
    for rows, cols in products:
        raw = model_local._raw_scores(rows, cols).view(rows.size(0) * rows.size(1), -1)
        raw @ cols.reshape(-1, cols.size(-1)), raw.T @ rows.reshape(-1, rows.size(-1))


def kernel_calls(kernel_inputs) -> None:
    """Forward and backward of the paired kernel (both directions) of every call."""
    kernel = attention_kernel.load()
    for raw, row_gram, col_gram, row_sq, col_sq, row_weight, col_weight in kernel_inputs:
        out, *state = kernel.paired_forward(raw, row_gram, col_gram, row_sq, col_sq, row_weight, col_weight, True,
                                            9.0, True)
        kernel.paired_backward(torch.ones_like(out), raw, row_sq, col_sq, row_weight, col_weight, state[:5],
                               state[5:], True, 9.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    if attention_kernel.load() is None:
        raise SystemExit("the fused attention kernel is not available here: nothing to bound")
    products, kernel_inputs = paired_calls()
    parts = {"  raw-score matmuls and their gradients": lambda: matmuls(products),
             "  fused kernel, forward + backward": lambda: kernel_calls(kernel_inputs)}
    total_steps = (args.rounds + 1) * args.steps
    step_runner = StepRunner("local", RSICD, total_steps)
    floor_runner = StepRunner("local", RSICD, total_steps, floor=True)
    times = {label: [] for label in parts}
    for _ in range(args.rounds + 1):  # the first round warms up
        for label, run in parts.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[label].append((time.perf_counter() - start) / args.steps)
        for _ in range(args.steps):  # a step and its floor on the same batch, one right after the other
            step_runner.step()
            floor_runner.step()
    steps, floors = (runner.clock.steps[args.steps:] for runner in (step_runner, floor_runner))
    medians = {"similarities + loss, forward + backward": statistics.median(
        sum(step[part][0] for part in SIMILARITY_PARTS) for step in steps)}
    medians.update({label: statistics.median(values[1:]) for label, values in times.items()})
    medians["training step"] = statistics.median(step["whole step"][0] for step in steps)
    medians["encoder floor"] = floor = statistics.median(step["whole step"][0] for step in floors)
    ratio = statistics.median(step["whole step"][0] / floor_step["whole step"][0]
                              for step, floor_step in zip(steps, floors))
    print(f"local step at RSICD sizes, {threads.describe()}, {len(kernel_inputs)} paired-kernel calls a step; wall ms "
          f"per step, medians of {args.rounds} rounds of {args.steps} steps")
    for label, value in medians.items():
        print(f"  {label:<44} {1e3 * value:7.1f}   {value / floor:5.2f}x the floor")
    bound = floor + medians["  raw-score matmuls and their gradients"] + medians["  fused kernel, forward + backward"]
    print(f"  floor + matmuls + kernel: {bound / floor:.2f}x the floor; the step: {ratio:.2f}x (the median of "
          f"{len(steps)} steps' ratios to their floor step)")


if __name__ == "__main__":
    main()
