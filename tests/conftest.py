"""Shared pytest set-up: `gpu`-marked tests skip cleanly where CUDA is absent, and every
test session works in its own `HYBRID_CACHE` (built-in corpora are fetched once per run)."""

import os

import pytest
import torch


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
