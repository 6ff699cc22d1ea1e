"""Shared plumbing for the command-line tools: clean error exits."""

from __future__ import annotations

import sys

from latro_jax.config import ConfigError
from latro_jax.convert.weights import WeightError
from latro_jax.data.tasks import DataError
from latro_jax.experiment import ExperimentError

USER_ERRORS = (ConfigError, WeightError, DataError, ExperimentError, FileNotFoundError, FileExistsError)


def run(main) -> None:
    """Call main(); a user error prints one line naming the problem and exits 2."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
