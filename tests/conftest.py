"""Fixtures for the core tests; the helpers they share are in neat_testing.py."""

import copy

import pytest
import torch

import neat_testing  # noqa: F401  (sets the offline environment and the thread count before any test runs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_copy():
    """fresh_copy(model) -> an independent deep copy (so two wrappers never share weights)."""
    return copy.deepcopy


@pytest.fixture(scope="module")
def isolated_datasets_cache(tmp_path_factory):
    """`datasets` caches what it reads from local folders; keep the tests' copies out of the user's cache."""
    import datasets

    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("datasets_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = saved
