"""Wall time of training steps on a real prepared dataset: what the SYNTHETIC profile cannot show (real
caption lengths and their long tail, real labels). Training flags are passed on as given; the run folders
go to a temporary directory and the first --warmup steps are not timed.

    python -m benchmarks.real_steps --kind local --threads 2 --data_path data/fine-grained-data \\
        --data_name rsicd_precomp --cnn_dim 1280 --embed_size 128 --batch_size 64
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from runtime import allocator, threads

threads.passive_wait_policy()  # as the training scripts do, before torch loads

import torch  # noqa: E402

import trainer  # noqa: E402
from data import make_loader, shuffled_batches  # noqa: E402


def step_seconds(kind: str, train_flags: list[str], steps: int, warmup: int) -> tuple[list[float], int]:
    """Seconds of each timed training step (shuffled batches of the train split) and the epoch's step count."""
    with tempfile.TemporaryDirectory() as run_dir:
        run = trainer.Trainer(kind, trainer.parse_options(kind, [*train_flags, "--logger_name", run_dir,
                                                                 "--model_name", run_dir]))
        try:
            batches = shuffled_batches(len(run.train_set), run.opt["batch_size"], torch.Generator().manual_seed(0))
            run.model.train()
            times = []
            for batch in make_loader(run.train_set, run.opt["batch_size"], 0, batches[:warmup + steps]):
                start = time.perf_counter()
                run.train_step(batch)
                times.append(time.perf_counter() - start)
        finally:
            run.release()
    return times[warmup:], len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("global", "local"), default="local")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args, train_flags = p.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as the training scripts do
    times, epoch_steps = step_seconds(args.kind, train_flags, args.steps, args.warmup)
    low, median, high = statistics.quantiles(times)
    print(f"{args.kind}: {threads.describe()}, {len(times)} timed steps: median {1e3 * median:.1f} ms wall "
          f"(quartiles {1e3 * low:.1f}-{1e3 * high:.1f}); {epoch_steps} steps an epoch: "
          f"{median * epoch_steps:.0f} s of steps")


if __name__ == "__main__":
    main()
