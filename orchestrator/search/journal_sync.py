"""The Optuna journal of a run on remote storage (s3://, gs://): a local file for Optuna, mirrored to the run
directory as the run goes, and brought back by a `--resume` on a head that lost it.

Decisions:
- Optuna's journal appends to a local file (object stores cannot append), in this tool's cache. The driver
  uploads the whole file to `RUN/optuna-journal.log` once the study exists and after every trial ends (a Tune
  callback, which Tune calls after the searcher has told the study), atomically; so the run directory holds
  everything a resume needs as the run goes (the journal, the finished records, run.json), and a head that
  dies loses at most the asks of running trials, which the next trials take up anyway.
- A resume reconciles the two copies of an append-only file: the local one wins only when it extends the run
  directory's (this head got further than its last upload); otherwise the run directory's copy is the truth, and
  a local copy that disagrees with it is set aside (said once).
- A new run never starts from a stale local journal of an earlier run of the same name: that is set aside too.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

from ray.tune import Callback

from orchestrator.files.fs import read_bytes, upload_file

JOURNAL_FILE = "optuna-journal.log"  # beside the results (optuna-dashboard opens it)


def push_journal(local: str, run_dir: str) -> None:
    """Upload the local journal to `run_dir` (atomically); nothing when there is none yet."""
    if Path(local).is_file():
        upload_file(local, run_dir, JOURNAL_FILE)


def pull_journal(run_dir: str, local: str) -> str:
    """Before a resume opens the local journal: make it the newer of the two copies (see the module's decisions);
    return what was done ('' for nothing, 'downloaded', 'kept local', or where a disagreeing local copy went)."""
    remote = read_bytes(run_dir, JOURNAL_FILE)
    path = Path(local)
    mine = path.read_bytes() if path.is_file() else None
    if remote is None or mine == remote:
        return ""
    if mine is not None and mine.startswith(remote):
        return "kept local"
    aside = "" if mine is None or remote.startswith(mine) else set_aside(local)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(remote)
    tmp.replace(path)
    if aside:
        print(f"note: the journal on this machine disagreed with {run_dir}'s; using the run directory's (this "
              f"machine's is kept as {aside})", file=sys.stderr, flush=True)  # fmt: skip
    return aside or "downloaded"


def set_aside(local: str) -> str:
    """Move a local journal out of the way; return where it went ('' when there was none)."""
    path = Path(local)
    if not path.is_file():
        return ""
    aside = path.with_name(f"{path.name}.set-aside-{uuid.uuid4().hex[:8]}")
    path.replace(aside)
    return str(aside)


class JournalMirror(Callback):
    """Uploads the run's journal to its run directory after every trial ends (Tune calls the searcher first)."""

    def __init__(self, local: str, run_dir: str) -> None:
        self.local = local
        self.run_dir = run_dir
        self._warned = False

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.push()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.push()

    def push(self) -> None:
        """Upload now; a failure is said once (on stderr) and the next trial's end tries again."""
        try:
            push_journal(self.local, self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a storage hiccup must not end the search; the next upload retries
            if not self._warned:
                self._warned = True
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(f"warning: could not upload the journal to {self.run_dir} ({first}); retrying after the "
                      "next trial", file=sys.stderr, flush=True)  # fmt: skip
