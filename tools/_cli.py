"""Shared plumbing for the command-line tools: clean error exits."""

from __future__ import annotations

import argparse
import sys

from latro_jax.config import ConfigError
from latro_jax.convert.weights import WeightError
from latro_jax.data.tasks import DataError
from latro_jax.experiment import ExperimentError
from latro_jax.runs import SaveError

USER_ERRORS = (ConfigError, WeightError, DataError, ExperimentError, SaveError, FileNotFoundError, FileExistsError,
               PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes (a bad value, an unknown option, a missing argument) are
    one line and exit 2 like the tools' other user errors, not the usage block."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message} (--help lists the arguments)", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """Call main(); a user error prints one line naming the problem and exits 2."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
