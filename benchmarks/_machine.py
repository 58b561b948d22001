"""What the benchmarks share: the record of the machine they ran on, and the thread setting's help."""

from __future__ import annotations

import os
import platform

import torch
import transformers

THREADS_HELP = (
    "torch intra-op threads (0: torch's default). Default 1: on a small machine shared with other jobs, "
    "torch's OpenMP threads wait on descheduled partners and every forward slows down 20-40x, erratically"
)


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
