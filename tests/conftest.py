"""Shared fixtures. Real files (tokenizers, datasets, stories260K) come from one place:
$LATRO_TEST_DATA, default ../shared/data beside the checkout; tests that need them skip where absent."""

from __future__ import annotations

import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")  # f32 tests compare against PyTorch f32

DEFAULT_TEST_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def test_data_dir() -> str:
    return os.path.abspath(os.environ.get("LATRO_TEST_DATA", DEFAULT_TEST_DATA))


@pytest.fixture(scope="session")
def test_data():
    """Path to the shared test data, or skip naming what is missing."""
    path = test_data_dir()
    if not os.path.isdir(path):
        pytest.skip(f"test data not found at {path} (set LATRO_TEST_DATA to the shared/data folder)")
    return path


def require(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"test file not found: {path} (set LATRO_TEST_DATA to the shared/data folder)")
    return path
