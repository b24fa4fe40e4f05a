"""What a cluster run keeps on its storage path, and the nodes that cannot write there.

- Resume after losing the head: a search on a storage path reached only through the filesystem API (a `file://`
  URI standing in for a bucket) is killed; its head's local state is deleted; `--resume` on a fresh head (an
  empty cache) finishes the run from the storage path alone, computing no finished trial again.
- A worker that joins after the preflight (as autoscaled workers do) and cannot write the run directory fails its
  first trial with one line naming the node and the fix, and the search stops instead of burning its budget.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from orchestrator.artifacts.tables import TRIALS_FILE, read_table
from orchestrator.errors import UserError
from orchestrator.search import SearchConfig, driver, preflight, run
from orchestrator.search.prepare import JOURNAL_FILE, journal_path
from orchestrator.search.sampler import journal_storage
from orchestrator.search.space_options import options_from_json
from tests.waiting import HANG_S, simulated_cluster, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--smoke-test", "--no-report", "--families", "quantization"]


def _search(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "search.py"), *args]


def _environ(cache: Path | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ORCHESTRATOR_PAUSE_AT")}
    return environ if cache is None else {**environ, "COMPRESSION_CACHE": str(cache)}


def _complete_trials(journal: bytes, where: Path, name: str) -> int:
    copy = where / "journal-copy.log"
    copy.write_bytes(journal)
    study = optuna.load_study(study_name=name, storage=journal_storage(copy))
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_a_fresh_head_resumes_from_the_storage_path_alone(tmp_path):
    bucket = tmp_path / "bucket"
    run_uri = f"file://{bucket}/lost-head"
    args = ["--storage-path", f"file://{bucket}", "--name", "lost-head", "--num-trials", "5", "--concurrency", "1"]
    args += SMALL
    first = subprocess.Popen(
        _search(*args),
        env=_environ(),  # the first head: the session's cache (its trained baseline)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run_dir = bucket / "lost-head"

    def records() -> list[Path]:
        return list(run_dir.glob("finished/*/final_result.json"))

    wait_for(lambda: len(records()) >= 3 or first.poll() is not None, "3 finished trials or the head's exit")
    assert first.poll() is None, "the search ended before its head could be lost"
    os.killpg(first.pid, signal.SIGKILL)  # the head dies with its Ray
    first.wait()
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(first.pid, signal.SIGKILL)
    kept = {p.parent.name for p in records()}
    assert 3 <= len(kept) < 5
    # as the run went, the storage path received the journal (with the trials Tune had heard of) and run.json
    on_storage = (run_dir / JOURNAL_FILE).read_bytes()
    assert _complete_trials(on_storage, tmp_path, "lost-head") >= 1
    assert (run_dir / "run.json").is_file()
    local = Path(journal_path(run_uri))  # the lost head's own state: gone with it
    assert local.is_file()
    local.unlink()

    fresh = tmp_path / "fresh-head-cache"  # a new head: nothing cached, not even the trained baseline
    second = subprocess.run(
        _search(*args, "--resume"), env=_environ(fresh), capture_output=True, text=True, timeout=HANG_S
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert [p.read_bytes() for p in (fresh / "journals").glob("*.log")] == [(run_dir / JOURNAL_FILE).read_bytes()]
    rows, info = read_table(str(run_dir), TRIALS_FILE)
    assert len(rows) == 5 and {r["status"] for r in rows} == {"completed"}
    assert info["complete"] is True
    restored = [line for line in second.stderr.splitlines() if "(kept from before)" in line]
    assert len(restored) >= len(kept), second.stderr[-4000:]  # every finished trial came back, none recomputed
    assert {p.parent.name for p in records()} >= kept and len(records()) == 5
    assert _complete_trials((run_dir / JOURNAL_FILE).read_bytes(), tmp_path, "lost-head") == 4  # all but the baseline


def test_a_worker_that_joins_later_and_cannot_write_stops_the_search(tmp_path, monkeypatch):
    """A CPU-less head, a worker that can write, and one that joins after the preflight and cannot: the trials
    placed there fail in one line naming it, and the search stops with that line (exit 2 in the CLI)."""
    import ray

    ray.shutdown()
    cluster = simulated_cluster({"num_cpus": 1})
    joined = []
    checked = driver.check_storage_writable

    def then_a_worker_joins(run_dir: str, **kwargs) -> None:
        checked(run_dir, **kwargs)  # every node alive now can write
        denied = {preflight.SIMULATE_UNWRITABLE: "1"}  # this node's storage refuses its writes
        joined.append(cluster.add_node(num_cpus=2, env_vars=denied, wait=False))
        cluster.wait_for_nodes(timeout=HANG_S)

    monkeypatch.setattr(driver, "check_storage_writable", then_a_worker_joins)
    space = options_from_json({"families": ["quantization"], "distillation": {"epochs": [1]}})
    config = SearchConfig(
        address=cluster.address,
        space=space,
        num_trials=12,
        concurrency=3,  # one trial fits the good worker: two go to the late one at once
        storage_path=str(tmp_path),
        name="late",
        report=False,
    )
    try:
        with pytest.raises(UserError) as raised:
            run(config)
    finally:
        ray.shutdown()
        cluster.shutdown()
    message = str(raised.value)
    late = joined[0].node_id
    assert message.startswith(f"node {late} ({joined[0].node_ip_address}) cannot write to {tmp_path / 'late'}: ")
    assert "PermissionError: [simulated] permission denied" in message
    assert "use shared storage" in message and message.endswith("--resume --name late (finished trials are kept)")
    assert "\n" not in message
    rows, info = read_table(str(tmp_path / "late"), TRIALS_FILE)
    assert info["complete"] is False
    assert sum(r["status"] == "completed" for r in rows) < 12  # stopped, not run to the end of its budget
    assert not any(r["node_id"] == late and r["status"] == "completed" for r in rows)
