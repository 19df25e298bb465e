"""One error type for everything a user can get wrong, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class BlueberryError(Exception):
    """A user-facing problem (bad config, missing file, unreachable store). Printed as one line, exit 2."""

    exit_code = 2


class ConfigError(BlueberryError):
    """A config or spec value is wrong; the message names the dotted key, the value and what is allowed."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: BlueberryError -> one line on stderr and exit 2, Ctrl-C -> exit 130."""
    try:
        code = main()
    except BlueberryError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
