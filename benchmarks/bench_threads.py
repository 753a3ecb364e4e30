"""Thread policy on this CPU: RSICD-sized training steps with 1 and 2 torch threads, two trainings side
by side, torchrun on CPU, and OpenMP's wait settings (sleep, spin, a short spin), all in one command.

    python -m benchmarks.bench_threads              20 steps per configuration (a few minutes)
    python -m benchmarks.bench_threads --steps 8    quicker

Every configuration trains the real Trainer (train_epoch) on SYNTHETIC RSICD-shaped data for --steps
batches of 64 and reports seconds per step: wall (what a user waits) and CPU of the process. Side-by-side
processes start together; their figures are the mean over the processes. Run it on an otherwise quiet
machine: other jobs change every figure (the load average is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.shapes import RSICD, write_dataset

PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def configurations(spin: int) -> dict[str, tuple]:
    """name -> (processes, threads each, OpenMP wait settings (none: OpenMP's default), under torchrun); the
    short-spin ones spin `spin` times (GOMP_SPINCOUNT) before sleeping."""
    short_spin = {"GOMP_SPINCOUNT": str(spin)}
    return {
        "1 process, 1 thread": (1, 1, PASSIVE, False),
        "1 process, 2 threads, OpenMP default wait": (1, 2, {}, False),
        "1 process, 2 threads, PASSIVE": (1, 2, PASSIVE, False),
        "2 processes side by side, 1 thread each": (2, 1, PASSIVE, False),
        "2 processes side by side, 2 threads each, OpenMP default wait": (2, 2, {}, False),
        "2 processes side by side, 2 threads each, PASSIVE": (2, 2, PASSIVE, False),
        "torchrun --nproc_per_node 2 (gloo), 1 thread each": (2, 1, PASSIVE, True),
        f"1 process, 2 threads, GOMP_SPINCOUNT={spin}": (1, 2, short_spin, False),
        f"2 processes side by side, 2 threads each, GOMP_SPINCOUNT={spin}": (2, 2, short_spin, False),
    }


def child(kind: str, data_flags: list[str], run_dir: str) -> None:
    """Train one epoch of the prepared split; its wall and CPU seconds go to run_dir/result_<rank>.json."""
    import torch

    from runtime import allocator, threads
    from options import parse_options
    from trainer import Trainer
    allocator.keep_freed_memory()  # as the training scripts do
    argv = [*data_flags, *RSICD.flags(), "--device", "cpu", "--logger_name", run_dir, "--model_name", run_dir,
            "--num_epochs", "1"]
    trainer = Trainer(kind, parse_options(kind, argv))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train_epoch()
        result = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "steps": trainer.step,
                  "threads": threads.describe(), "torch_threads": torch.get_num_threads()}
        with open(os.path.join(run_dir, f"result_{trainer.dist.rank}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
    finally:
        trainer.release()


def launch(kind: str, config: tuple, data_flags: list[str], root: str, name: str) -> list[dict]:
    """Start the configuration's processes together; the result of each."""
    processes, threads_each, wait, torchrun = config
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({"OMP_NUM_THREADS": str(threads_each), "MKL_NUM_THREADS": str(threads_each), **wait})
    module = ["-m", "benchmarks.bench_threads", "--child", kind, "--data", json.dumps(data_flags)]
    tag = name.replace(" ", "_").replace(",", "")
    if torchrun:
        run_dirs = [os.path.join(root, f"{kind}_{tag}")]
        commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(processes), *module, "--run_dir", run_dirs[0]]]
    else:
        run_dirs = [os.path.join(root, f"{kind}_{tag}_{i}") for i in range(processes)]
        commands = [[sys.executable, *module, "--run_dir", run_dir] for run_dir in run_dirs]
    running = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]
    for process in running:
        _, err = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{name} ({kind}) failed:\n{err[-2000:]}")
    results = []
    for run_dir in run_dirs:
        for file in sorted(f for f in os.listdir(run_dir) if f.startswith("result_")):
            with open(os.path.join(run_dir, file), encoding="utf-8") as f:
                results.append(json.load(f))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="training steps (batches of 64) per configuration")
    p.add_argument("--kinds", default="global,local")
    p.add_argument("--only", default="", help="comma-separated configuration numbers (1-based), default all")
    p.add_argument("--spin", type=int, default=100000, help="GOMP_SPINCOUNT of the short-spin configurations")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--run_dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, json.loads(args.data), args.run_dir)
    configs = configurations(args.spin)
    names = list(configs)
    chosen = [names[int(i) - 1] for i in args.only.split(",")] if args.only else names
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before; {args.steps} steps of batch "
          f"{RSICD.batch_size} per configuration; an RSICD epoch is {RSICD.train_steps()} steps", flush=True)
    with tempfile.TemporaryDirectory() as root:
        images = args.steps * RSICD.batch_size // RSICD.captions_per_image
        data = {kind: [x for pair in write_dataset(root, RSICD, kind, {"train": images, "dev": 4}).items()
                       for x in pair] for kind in args.kinds.split(",")}
        print(f"\n| configuration | {' | '.join(f'{k} s/step wall (CPU)' for k in data)} | load |")
        print(f"|---|{'---|' * len(data)}---|")
        for name in chosen:
            cells = []
            for kind, flags in data.items():
                results = launch(kind, configs[name], flags, root, name)
                wall = sum(r["wall"] / r["steps"] for r in results) / len(results)
                cpu = sum(r["cpu"] / r["steps"] for r in results) / len(results)
                cells.append(f"{wall:.3f} ({cpu:.3f})")
            print(f"| {name} | {' | '.join(cells)} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
