import os
from pathlib import Path

import pytest
import torch

# Small, deterministic CPU runs: the CI machine has 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second intra-op thread
    only adds synchronisation on a busy 2-core machine (up to 10x the CPU time). Restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tensorrt_include_dir(request) -> Path:
    """TENSORRT_INCLUDE_DIR (a directory holding NvInfer.h, tools/fetch_trt_headers.md shows how to get one) for the
    tests that compile against TensorRT's headers: skipped when unset, failed when it holds no NvInfer.h."""
    include_dir = os.environ.get("TENSORRT_INCLUDE_DIR")
    if not include_dir:
        pytest.skip(f"TENSORRT_INCLUDE_DIR is not set: skipping {request.node.name} (set it to a directory holding "
                    "NvInfer.h; tools/fetch_trt_headers.md shows how to get them)")
    if not (Path(include_dir) / "NvInfer.h").is_file():
        pytest.fail(f"TENSORRT_INCLUDE_DIR={include_dir} holds no NvInfer.h")
    return Path(include_dir)
