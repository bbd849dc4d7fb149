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
