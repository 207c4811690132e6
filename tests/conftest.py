"""Test set-up: one thread per rank, GPU tests skipped cleanly without CUDA."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: ranks share 2 cores

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
