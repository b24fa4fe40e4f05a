"""Test-wide settings: baselines are cached in a temporary directory, never in the user's cache."""

from __future__ import annotations

import collections
import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    previous = os.environ.get("COMPRESSION_CACHE")
    os.environ["COMPRESSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("COMPRESSION_CACHE", None)
    else:
        os.environ["COMPRESSION_CACHE"] = previous


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Each test leaves torch's thread count as it found it (a trial run in-process sets it): results compared
    bitwise with a fresh process depend on it, and `make test` runs many files in one process."""
    from orchestrator.measure import torch_threads

    with torch_threads(None):  # sets nothing, restores the count on the way out
        yield


@pytest.fixture(scope="session")
def digits():
    """The real digits workload (its baseline trains once per test session, in about 10 s)."""
    from orchestrator.workloads import resolve_workload

    return resolve_workload("digits")


@pytest.fixture(scope="session")
def digits_baseline(digits):
    return digits.load_baseline()


def pytest_collection_modifyitems(config, items):
    # The longest files first, so that `make test`'s parallel workers start them early and finish together: those
    # with the most searches (`ray`), then those with any `slow` test. A file's tests stay together and in order.
    searches = collections.Counter(item.path for item in items if item.get_closest_marker("ray"))
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (-searches[item.path], item.path not in slow_files))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
