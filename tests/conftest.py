"""Shared pytest set-up: `gpu`-marked tests skip cleanly where CUDA is absent, and every
test session works in its own `HYBRID_CACHE` (built-in corpora are fetched once per run)."""

import importlib.util
import os

import pytest
import torch

# one Triton config per kernel: the suites run many shapes, and autotuning each costs minutes
os.environ.setdefault("HYBRID_TRITON_AUTOTUNE", "0")

# The search's dependencies are always installed here and in CI; on a bare GPU host that was
# given only the CuTe/FA4 bundle they are not, and these modules (none `gpu`-marked) are left
# out of collection instead of failing it.
SEARCH_DEPENDENCIES = ("optuna", "mlflow", "pydantic")
collect_ignore = (
    []
    if all(importlib.util.find_spec(m) for m in SEARCH_DEPENDENCIES)
    else ["test_search_e2e.py", "test_search_space.py", "test_latency.py", "test_distributed.py"]
)


@pytest.fixture(scope="session", autouse=True)
def hybrid_cache(tmp_path_factory):
    previous = os.environ.get("HYBRID_CACHE")
    os.environ["HYBRID_CACHE"] = str(tmp_path_factory.mktemp("hybrid-cache"))
    yield os.environ["HYBRID_CACHE"]
    if previous is None:
        del os.environ["HYBRID_CACHE"]
    else:
        os.environ["HYBRID_CACHE"] = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
