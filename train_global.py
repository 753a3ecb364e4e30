"""Train the global-level subnetwork of M2HSE: `python train_global.py --help` lists the flags."""
from runtime import allocator, threads

threads.passive_wait_policy()  # before torch is imported
allocator.keep_freed_memory()  # each step reuses its temporaries instead of page-faulting them in

from runtime.errors import report_errors  # noqa: E402
from trainer import main  # noqa: E402

if __name__ == "__main__":
    report_errors(main)("global")
