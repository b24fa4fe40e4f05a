"""The project's user-facing error: printed as one line by the CLI, which then exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (unknown workload, missing data, malformed policy...): one clear line."""
