"""Shared plumbing for the command-line tools: the repo on sys.path and clean error exits."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from latro_jax.config import ConfigError  # noqa: E402
from latro_jax.convert.weights import WeightError  # noqa: E402
from latro_jax.data.tasks import DataError  # noqa: E402
from latro_jax.experiment import ExperimentError  # noqa: E402

USER_ERRORS = (ConfigError, WeightError, DataError, ExperimentError, FileNotFoundError, FileExistsError)


def run(main) -> None:
    """Call main(); a user error prints one line naming the problem and exits 2."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
