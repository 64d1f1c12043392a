"""User-facing errors: one clear line, exit code 2, raised before any training starts."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (missing folder, unknown name, bad option). The CLI prints the message and exits with code 2."""

    exit_code = 2


class RunFailed(Exception):
    """A run failed while training or evaluating; recorded in its run.json, exit code 1 for the sweep."""

    exit_code = 1
