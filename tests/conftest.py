"""Shared fixtures. Real files (tokenizers, datasets, stories260K) come from one place:
$LATRO_TEST_DATA, default ../shared/data beside the checkout; tests that need them skip where absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")  # f32 tests compare against PyTorch f32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_devices(script: str, devices: int, *args: str, timeout: int = 600) -> dict:
    """Run `script` (a test file's `__main__`) in a process of its own with `devices` simulated CPU
    devices, and return the JSON its last output line holds. XLA reads the device count once, when
    JAX first starts its backend, so the pytest process (and its xdist workers) cannot switch."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    result = subprocess.run([sys.executable, os.path.abspath(script), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    name = os.path.basename(script)
    assert result.returncode == 0, f"{name} on {devices} devices failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])

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
