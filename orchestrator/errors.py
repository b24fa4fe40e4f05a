"""The project's user-facing error: printed as one line by the CLI, which then exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (unknown workload, missing data, malformed policy...): one clear line.

    A message may quote what the user wrote (a key, a file name); line breaks in it are shown escaped, so
    the message stays one line whatever it quotes.
    """

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class StorageFull(UserError):
    """A write failed for lack of disk space; what was written before it is intact (writes are atomic)."""
