"""The argument parser every ``python -m`` entry point uses: a bad flag is one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` without the usage dump on an error: ``error: <what>; see <prog> --help``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
