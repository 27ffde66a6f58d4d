"""What a fine-tuning run leaves beside its model, in a module free of Ray: `merge` and the
GPU benchmark (bench/gpu.py, run where Ray is not installed) read it without importing the
Ray Train driver in train.py."""
from __future__ import annotations

import torch

SUMMARY = "clsjob_finetune.json"


def peak_memory_gib(device: str) -> float:
    """Peak memory of this worker: the GPU's allocator on CUDA, the process's RSS on CPU."""
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB -> GiB
