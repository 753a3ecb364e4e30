"""What bounds the local training step at RSICD sizes: its raw-score matmuls and its fused attention kernel
alone, against its similarities + MSB loss (forward and backward) and its encoder floor.

    python -m benchmarks.local_bounds [--threads 2] [--rounds 6]

All parts run on the same SYNTHETIC RSICD-shaped batches in alternating rounds (ratios robust to this
machine's drift), with the scripts' wait policy; wall ms per training step, medians over the rounds. The
matmuls (a[b, k, a, l] = <block, word> and its two gradients) and the kernel are work the similarities
cannot skip; the rest of their time is small tensor ops, autograd, OpenMP wake-ups and the loss.
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
from benchmarks.profile_step import profile_training  # noqa: E402
from benchmarks.shapes import RSICD, batch_of, in_memory_split  # noqa: E402
from loss import msb_loss  # noqa: E402
from model_factory import build_model  # noqa: E402
from runtime import allocator  # noqa: E402
from subnetwork import SIMILARITIES  # noqa: E402


def encoded_batches(count: int) -> tuple[torch.nn.Module, list]:
    """A local model and the encoder outputs (leaves that need gradients) and labels of `count` batches."""
    torch.manual_seed(0)
    split = in_memory_split(RSICD, "local", count * RSICD.batch_size // RSICD.captions_per_image + 1)
    model = build_model("local", RSICD.opt("local"), RSICD.vocab_size)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(1)).tolist()
    batches = []
    for i in range(count):
        cnn, bovw, captions, lengths, labels, _ = batch_of(split, order[i * RSICD.batch_size:(i + 1) * RSICD.batch_size])
        with torch.no_grad():
            encoded = model.encode(cnn, bovw, captions, lengths)
        batches.append(({k: v.requires_grad_() if v.is_floating_point() else v for k, v in encoded.items()}, labels))
    return model, batches


def attention_pairs(encoded: dict) -> list[tuple[model_local.Fragments, model_local.Fragments]]:
    """(rows, cols) fragments of each paired_attention call of a step: S_P and S_A1 in caption groups, S_A2 whole."""
    blocks = {name: encoded[name].detach() for name in ("cnn", "bovw")}
    block_lengths = torch.full((RSICD.batch_size,), blocks["cnn"].size(1))
    pairs = [(model_local.Fragments.of(blocks["cnn"], block_lengths), model_local.Fragments.of(blocks["bovw"], block_lengths))]
    lengths = encoded["lengths"]
    by_length = torch.argsort(lengths, stable=True)
    for rows, words in ((blocks["cnn"], encoded["cnn_words"]), (blocks["bovw"], encoded["bovw_words"])):
        row_fragments = model_local.Fragments.of(rows, block_lengths)
        pairs += [(row_fragments, model_local.Fragments.of(words.detach()[group], lengths[group]))
                  for group in by_length.split(model_local.COLUMN_GROUP)]
    return pairs


def matmuls(pairs) -> None:
    """The raw scores of every call and their two gradients (as the mm backward computes them)."""
    for rows, cols in pairs:
        flat_rows, flat_cols = rows.vectors.reshape(-1, rows.vectors.size(-1)), cols.vectors.reshape(-1, cols.vectors.size(-1))
        raw = flat_rows @ flat_cols.T
        raw @ flat_cols, raw.T @ flat_rows


def kernel_calls(prepared) -> None:
    """Forward and backward of the fused kernel, both directions of every call (inputs prepared beforehand)."""
    kernel = attention_kernel.load()
    for raw, gram, sq_norms, query_mask, context_mask in prepared:
        out, *saved = kernel.forward(raw, gram, sq_norms, query_mask, context_mask, True, 9.0, True)
        kernel.backward(torch.ones_like(out), raw, sq_norms, query_mask, *saved, True, 9.0)


def kernel_inputs(pairs) -> list:
    prepared = []
    for rows, cols in pairs:
        raw = model_local._raw_scores(rows.vectors, cols.vectors)
        for raw_tile, context, query in ((raw, rows, cols), (raw.permute(2, 3, 0, 1).contiguous(), cols, rows)):
            prepared.append((raw_tile, context.gram, query.sq_norms, query.mask.float(), context.mask.float()))
    return prepared


def similarities_and_loss(model, encoded: dict, labels: torch.Tensor) -> None:
    sims = {name: model.similarity(name, encoded) for name in SIMILARITIES}
    loss = sum(weight * msb_loss(sims[name], labels) for name, weight in model.loss_weights().items())
    torch.autograd.grad(loss, [v for v in encoded.values() if v.is_floating_point()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="batches (steps) per round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    if attention_kernel.load() is None:
        raise SystemExit("the fused attention kernel is not available here: nothing to bound")
    model, batches = encoded_batches(args.steps)
    pairs = [attention_pairs(encoded) for encoded, _ in batches]
    prepared = [kernel_inputs(p) for p in pairs]
    parts = {"similarities + loss, forward + backward": lambda: [similarities_and_loss(model, *b) for b in batches],
             "  raw-score matmuls and their gradients": lambda: [matmuls(p) for p in pairs],
             "  fused kernel, forward + backward": lambda: [kernel_calls(p) for p in prepared]}
    times = {label: [] for label in [*parts, "training step", "encoder floor"]}
    for _ in range(args.rounds + 1):  # the first round warms up
        for label, run in parts.items():
            start = time.perf_counter()
            run()
            times[label].append((time.perf_counter() - start) / args.steps)
        times["training step"].append(profile_training("local", RSICD, args.steps)["whole step"][0])
        times["encoder floor"].append(profile_training("local", RSICD, args.steps, floor=True)["whole step"][0])
    medians = {label: statistics.median(values[1:]) for label, values in times.items()}
    floor = medians["encoder floor"]
    print(f"local step at RSICD sizes, {torch.get_num_threads()} thread(s), {threads.describe()}; wall ms per step, "
          f"medians of {args.rounds} alternating rounds of {args.steps} steps")
    for label, value in medians.items():
        print(f"  {label:<44} {1e3 * value:7.1f}   {value / floor:5.2f}x the floor")
    bound = floor + medians["  raw-score matmuls and their gradients"] + medians["  fused kernel, forward + backward"]
    print(f"  floor + matmuls + kernel: {bound / floor:.2f}x the floor (the step: "
          f"{medians['training step'] / floor:.2f}x)")


if __name__ == "__main__":
    main()
