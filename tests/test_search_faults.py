"""The search under faults: SIGKILL at random moments, Ctrl-C, a moved run directory, two runs of one name,
another Ray cluster on the machine, a GPU that does not work. What README's "What is promised under faults"
section says is what these tests show."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from orchestrator.artifacts import store
from orchestrator.artifacts.tables import PARETO_FILE, TRIALS_FILE, read_table
from orchestrator.errors import UserError
from orchestrator.search.sampler import journal_storage
from orchestrator.workloads import resolve_workload
from tests.waiting import HANG_S

REPO = Path(__file__).resolve().parents[1]
FAMILIES = "quantization,unstructured_pruning"
TRIALS = 8


def search_args(storage: Path, name: str, *extra: str) -> list[str]:
    space = storage / "space.json"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(json.dumps({"distillation": {"epochs": [1]}}))
    return [
        sys.executable,
        str(REPO / "search.py"),
        *("--storage-path", str(storage), "--name", name, "--families", FAMILIES),
        *("--num-trials", str(TRIALS), "--concurrency", "1", "--search-space", str(space), "--no-report"),
        *extra,
    ]


def launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True)


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    process.wait(timeout=120)
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # Ray's own processes, orphaned by the driver's death


def final_results(run_dir: Path) -> list[dict]:
    """Every final result any trial ever reported, computed or restored (Tune's result.json files)."""
    found = []
    for path in run_dir.glob("trial_*/result.json"):
        found += [r for r in map(json.loads, path.read_text().splitlines()) if r.get("final")]
    return found


def unnamed(policy_json: str) -> str:
    """A policy document without its display name (the tables name the reference policies)."""
    doc = json.loads(policy_json)
    doc.pop("name", None)
    return json.dumps(doc, sort_keys=True)


def computations(run_dir: Path) -> collections.Counter:
    """How often each policy was computed (not restored from a finished record)."""
    return collections.Counter(r["policy_json"] for r in final_results(run_dir) if not r.get("restored"))


def journal_states(run_dir: Path, name: str) -> collections.Counter:
    study = optuna.load_study(study_name=name, storage=journal_storage(run_dir / "optuna-journal.log"))
    return collections.Counter(t.state.name for t in study.trials)


def policies(run_dir: Path) -> list[str]:
    trials, _ = read_table(str(run_dir), TRIALS_FILE)
    return sorted(t["policy_json"] for t in trials)


def check_resumed_run(run_dir: Path, name: str, clean: Path) -> None:
    trials, info = read_table(str(run_dir), TRIALS_FILE)
    assert info["complete"] is True and len(trials) == TRIALS
    assert {t["status"] for t in trials} == {"completed"}
    assert policies(run_dir) == policies(clean)  # the same trials as a run never interrupted
    assert max(computations(run_dir).values()) == 1  # no finished trial ran twice
    assert journal_states(run_dir, name) == collections.Counter({"COMPLETE": TRIALS - 1})  # baseline outside
    pareto, _ = read_table(str(run_dir), PARETO_FILE)
    workload = resolve_workload("digits")
    for row in pareto:  # every Pareto checkpoint verifies and reproduces its metric
        checkpoint = store.load(str(run_dir / row["checkpoint"]), workload)
        assert workload.evaluate(checkpoint.model, "validation") == row["validation"]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("clean")
    result = subprocess.run(search_args(storage, "clean"), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return storage / "clean"


@pytest.fixture
def cpu_load():
    """A process burning a core beside the test: the faults must hold on a loaded machine."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


def wait_for(predicate, process: subprocess.Popen, what: str, ceiling_s: float = 900) -> None:
    """Wait for an event of the run (never a fixed time); the ceiling only stops a hung run."""
    deadline = time.monotonic() + ceiling_s
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the search ended before {what}: {process.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {ceiling_s} s")
        time.sleep(0.1)


def records(run_dir: Path) -> int:
    return len(list((run_dir / "finished").glob("*/final_result.json")))


def malicious_pickle(marker: Path) -> bytes:
    """A pickle that runs code when it is loaded: what a tampered tuner.pkl or searcher state would be."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Payload())


def damage_tunes_state(run_dir: Path, marker: Path) -> None:
    """What a kill while Tune writes its state leaves, at worst: no experiment state, and pickles that are cut
    short or (copied from someone) run code when loaded."""
    for state in run_dir.glob("experiment_state-*.json"):
        state.unlink()
    (run_dir / "tuner.pkl").write_bytes(malicious_pickle(marker))
    for searcher_state in run_dir.glob("searcher-state-*"):
        searcher_state.write_bytes(malicious_pickle(marker)[:7])


def torn_journal(run_dir: Path) -> None:
    """What a kill in the middle of an append to the journal leaves."""
    with open(run_dir / "optuna-journal.log", "ab") as journal:
        journal.write(b'{"op_code":6,"worker_id":"cut sh')


def launch_paused(args: list[str], place: str | None, paused: Path) -> subprocess.Popen:
    """`launch`, asking the run to hold still at the pause point `place` (see orchestrator/search/pause.py)."""
    env = {**os.environ, "ORCHESTRATOR_PAUSE_AT": place or "", "ORCHESTRATOR_PAUSE_FILE": str(paused)}
    paused.unlink(missing_ok=True)
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_at_each_phase_then_resume_gives_the_clean_runs_trials(tmp_path, clean_run, cpu_load):
    """One run killed at each of the driver's phases in turn, resumed after each kill, ends as the clean run."""
    storage, marker, paused = tmp_path / "runs", tmp_path / "code-ran", tmp_path / "paused"
    run_dir = storage / "faulty"
    said = []
    for step, (place, damage) in enumerate(
        [
            ("before_first_trial", None),  # the study exists, no trial has run
            ("trial_recorded", None),  # a trial's record is kept, Tune has not heard of it
            (None, damage_tunes_state),  # killed while Tune writes its state, which runs code if unpickled
            (None, lambda run_dir, marker: torn_journal(run_dir)),  # killed in the middle of a journal append
            ("collect", None),  # every trial ended, Pareto checkpoints written, tables not yet
        ]
    ):
        process = launch_paused(search_args(storage, "faulty", *(["--resume"] if step else [])), place, paused)
        if place is not None:
            wait_for(paused.exists, process, f"the pause at {place}")
        else:
            done = records(run_dir)
            wait_for(lambda: records(run_dir) > done, process, "one more finished record")  # noqa: B023
        kill_group(process)
        said.append(process.stderr.read())
        if damage is not None:
            damage(run_dir, marker)
    finished = subprocess.run(search_args(storage, "faulty", "--resume"), capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "dropped its torn last line" in said[-1]  # the resume after the torn append said so
    assert not marker.exists(), "resuming ran code from the run directory"
    check_resumed_run(run_dir, "faulty", clean_run)


@pytest.mark.slow
@pytest.mark.ray
def test_sigkill_at_random_moments_under_load_then_resume_gives_the_clean_runs_trials(tmp_path, clean_run, cpu_load):
    rng = random.Random(20261201)
    storage = tmp_path / "runs"
    run_dir = storage / "faulty"

    def rerun() -> list[str]:  # as a user would rerun it: --resume once the run has written something
        started = run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir())
        return search_args(storage, "faulty", *(["--resume"] if started else []))

    for _ in range(4):
        process = launch(rerun())
        time.sleep(rng.uniform(2.0, 14.0))
        if process.poll() is not None:
            assert process.returncode == 0, process.stderr.read()[-4000:]
            break
        kill_group(process)
    # under load every kill may come before the run wrote anything; then the user starts it again, not --resume
    finished = subprocess.run(rerun(), capture_output=True, text=True, timeout=HANG_S)
    assert finished.returncode == 0, finished.stderr[-4000:]
    check_resumed_run(storage / "faulty", "faulty", clean_run)


def send_to_group(process: subprocess.Popen, sig: int) -> None:
    os.killpg(process.pid, sig)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(
    ("sig", "send", "code"),
    [
        (signal.SIGINT, send_to_group, 130),  # Ctrl-C in a terminal: the whole process group
        (signal.SIGTERM, subprocess.Popen.send_signal, 143),  # `timeout`, a scheduler: the driver alone
    ],
)
def test_a_stop_signal_leaves_partial_tables_and_a_moved_run_resumes(tmp_path, clean_run, sig, send, code):
    storage = tmp_path / "first"
    process = launch(search_args(storage, "moved"))
    # each trial writes its record as it ends (Tune's files sync later)
    wait_for(lambda: records(storage / "moved") >= 3, process, "3 finished records")
    send(process, sig)
    _, stderr = process.communicate(timeout=600)
    kill_group(process)
    assert process.returncode == code, stderr[-4000:]
    assert "--resume --name moved" in stderr and "SIGTERM received" not in stderr and "Traceback" not in stderr
    trials, info = read_table(str(storage / "moved"), TRIALS_FILE)
    assert info["complete"] is False and {t["status"] for t in trials} <= {"completed", "interrupted"}
    assert 3 <= sum(t["status"] == "completed" for t in trials) < TRIALS
    assert "FAIL" not in journal_states(storage / "moved", "moved")

    moved = tmp_path / "second"
    moved.mkdir()
    shutil.move(str(storage / "moved"), moved / "moved")
    resumed = subprocess.run(search_args(moved, "moved", "--resume"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    check_resumed_run(moved / "moved", "moved", clean_run)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for a few trials of the digits search, not for all of them."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.ray
def test_a_full_disk_is_one_line_and_resume_keeps_every_finished_trial(small_disk):
    first = subprocess.run(search_args(small_disk, "full"), capture_output=True, text=True, timeout=900)
    assert first.returncode == 2, first.stderr[-4000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert errors == [first.stderr.strip().splitlines()[-1]] and "disk holding" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in first.stderr
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]  # no half-written file anywhere
    finished = {unnamed(r["policy_json"]): r["validation"] for r in final_results(small_disk / "full")}
    assert 1 <= len(finished) < TRIALS

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    second = subprocess.run(search_args(small_disk, "full", "--resume"), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    trials, info = read_table(str(small_disk / "full"), TRIALS_FILE)
    assert info["complete"] is True and len(trials) == TRIALS and {t["status"] for t in trials} == {"completed"}
    kept = {unnamed(t["policy_json"]): t["validation"] for t in trials}
    assert all(kept[policy] == value for policy, value in finished.items())  # every finished trial is kept
    assert max(computations(small_disk / "full").values()) == 1  # ... and was not computed again
    states = journal_states(small_disk / "full", "full")
    assert "RUNNING" not in states and states["COMPLETE"] == TRIALS - 1  # failed attempts stay FAIL, honestly


def test_a_second_search_of_the_same_name_is_refused_while_the_first_runs(tmp_path):
    from orchestrator.search import SearchConfig, run

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom orchestrator.files.fs import directory_lock\n"
            f"with directory_lock({str(tmp_path / 'same')!r}):\n    print('held', flush=True)\n    time.sleep(3600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="in use by another search"):
            run(SearchConfig(storage_path=str(tmp_path), name="same", resume=True))
        cli = subprocess.run(
            [sys.executable, str(REPO / "search.py"), "--storage-path", str(tmp_path), "--name", "same"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [
            f"error: {tmp_path / 'same'} is in use by another search (process {holder.pid}); wait for it, or "
            "choose another --name"
        ]
    finally:
        holder.kill()
        holder.wait()


START_RAY = (
    "import ray\nfrom orchestrator.search import Resources\nfrom orchestrator.search.driver import start_ray\n"
    "start_ray(Resources(address={address!r}))\nprint(ray.get_runtime_context().gcs_address, flush=True)\n"
    "ray.shutdown()"
)


@pytest.mark.ray
def test_a_local_search_joins_another_ray_cluster_only_when_told(tmp_path):
    """A Ray cluster merely running on the machine is never joined; RAY_ADDRESS is honoured as Ray's own tools
    honour it (set: join that cluster); `--address local` forces a private Ray, over RAY_ADDRESS too."""
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ray, time\nray.init(address='local', num_cpus=1, include_dashboard=False)\n"
            "print(ray.get_runtime_context().gcs_address, flush=True)\ntime.sleep(3600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def gcs_of(address: str | None, **variables: str) -> str:
        ours = subprocess.run(
            [sys.executable, "-c", START_RAY.format(address=address)],
            env={**environ, **variables},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ours.returncode == 0, ours.stderr[-3000:]
        return ours.stdout.strip()

    try:
        address = other.stdout.readline().strip()
        assert address
        assert gcs_of(None) not in ("", address)  # running on the machine: left alone
        # RAY_ADDRESS set (as Ray Jobs and KubeRay set it): joined; that cluster asks for its token (Ray 2.60)
        assert gcs_of(None, RAY_ADDRESS=address, RAY_AUTH_MODE="token") == address
        assert gcs_of("local", RAY_ADDRESS=address, RAY_AUTH_MODE="token") not in ("", address)
        assert gcs_of(None, RAY_ADDRESS="local") not in ("", address)
    finally:
        kill_group(other)


def test_a_trial_given_a_gpu_that_does_not_work_fails_with_the_reason(monkeypatch):
    import ray
    import torch

    from orchestrator.search import trial

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="given GPU.*CUDA is not usable.*--gpus-per-trial 0"):
        trial._device()
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert trial._device() == torch.device("cpu")


def test_rows_of_trials_that_failed_before_reporting_or_were_cut_off():
    from types import SimpleNamespace

    from orchestrator.search.collect import RowContext, trial_rows
    from orchestrator.search.space import build_space
    from orchestrator.workloads.digits import DigitsCNN

    space = build_space(DigitsCNN())
    never_started = SimpleNamespace(metrics=None, error=RuntimeError("boom"), config=None, path="/r/trial_aaa")
    cut_off = SimpleNamespace(metrics={"validation": 0.5, "final": False}, error=None, config={}, path="/r/trial_b")
    for complete, status in ((True, "stopped_early"), (False, "interrupted")):
        rows = trial_rows([never_started, cut_off], RowContext(space, 0.99, None, complete))
        assert [(r.trial_id, r.status, r.feasible) for r in rows] == [("aaa", "failed", False), ("b", status, False)]
        assert rows[0].error == "RuntimeError: boom" and json.loads(rows[0].policy_json)["steps"] == []


def test_a_failed_trials_row_keeps_the_exceptions_own_line_after_a_long_remote_traceback():
    """Ray's errors carry the remote traceback before the exception's line; a long one (deep install paths, as in
    CI) must not cut that line off the row."""
    from orchestrator.search.collect import ERROR_CHARS, error_summary

    frames = "".join(f'  File "/a/long/install/path/{i}/module.py", line {i}, in f\n    g()\n' for i in range(200))
    error = RuntimeError(f"Traceback (most recent call last):\n{frames}ValueError: the exception's own line")
    summary = error_summary(error)
    assert len(summary) == ERROR_CHARS and summary.endswith("ValueError: the exception's own line")
    assert error_summary(RuntimeError("boom")) == "RuntimeError: boom" and error_summary(None) is None


class _TruncatedErrorTuner:
    """Tune's `fit` as it fails when a full disk left a trial's pickled error empty."""

    def fit(self):
        raise EOFError("Ran out of input")


def test_a_truncated_trial_error_on_a_full_disk_is_the_full_disk_line(small_disk):
    from types import SimpleNamespace

    from orchestrator.errors import StorageFull
    from orchestrator.search.driver import _fit

    run_dir = small_disk / "run"
    run_dir.mkdir()
    with contextlib.suppress(OSError):  # fill the disk
        (small_disk / "filler").write_bytes(bytes(8 * 1024 * 1024))
    prepared = SimpleNamespace(run_dir=str(run_dir), name="run")
    hopeful, told = SimpleNamespace(full=False), SimpleNamespace(full=True)
    with pytest.raises(StorageFull, match="disk holding .* is full.*--resume --name run"):
        _fit(_TruncatedErrorTuner(), prepared, hopeful)
    (small_disk / "filler").unlink()
    with pytest.raises(StorageFull):  # space freed since, but a trial failed for lack of it
        _fit(_TruncatedErrorTuner(), prepared, told)
    with pytest.raises(EOFError):  # space left and no trial short of it: not the disk's, raised as it is
        _fit(_TruncatedErrorTuner(), prepared, hopeful)


def test_ray_log_lines_that_a_full_disk_cannot_take_are_dropped_quietly(small_disk, capfd):
    import logging

    from orchestrator.search.driver import route_ray_logs

    log_file = small_disk / "search.log"
    route_ray_logs(log_file)
    with contextlib.suppress(OSError):  # fill the disk
        (small_disk / "filler").write_bytes(bytes(8 * 1024 * 1024))
    try:
        logging.getLogger("ray.tune").error("x" * 100_000)
    finally:
        for handler in list(logging.getLogger("ray").handlers):
            logging.getLogger("ray").removeHandler(handler)
            handler.close()
    assert "Traceback" not in capfd.readouterr().err


def test_an_error_file_the_full_disk_left_empty_counts_as_out_of_space(tmp_path):
    from orchestrator.search.stopping import ran_out_of_space

    trial = tmp_path / "trial_1"
    trial.mkdir()
    (trial / "error.txt").write_text("ValueError: not the disk")
    assert not ran_out_of_space(str(tmp_path))
    (trial / "error.pkl").write_bytes(b"")  # Tune's pickled error, cut short
    assert ran_out_of_space(str(tmp_path))
