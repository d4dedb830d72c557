"""What this process may use of its machine."""
from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system has one: a container's
    limit, taskset), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
