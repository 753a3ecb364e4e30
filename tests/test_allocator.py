"""runtime.allocator: freed memory is reused instead of being faulted in again."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHURN = """
import resource, sys
import numpy as np
from runtime import allocator
assert allocator.keep_freed_memory(sys.argv[1] == "keep")

def churn():
    for _ in range(10):
        block = np.ones(2 << 20, dtype=np.float32)  # 8 MiB, as a training step's temporaries
        del block

churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(policy: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHURN, policy], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_not_faulted_in_again() -> None:
    assert page_faults("keep") < 50
    # glibc's defaults fault every freed 8 MiB block in again: 2,048 small pages, fewer where huge pages serve it
    assert page_faults("default") > 1000
