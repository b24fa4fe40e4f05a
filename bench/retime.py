"""Re-timing benchmark: every Pareto checkpoint of finished searches re-timed as `orchestrator evaluate` does,
at another moment than the search, beside the speedup spread the search recorded.

    python -m bench.retime RUN_DIR [RUN_DIR ...] --out docs/bench/retime.json

Run it minutes or hours after the searches: each re-timing is paired (the checkpoint beside its baseline, as the
search timed it), and a check counts as agreeing when its spread and the recorded one overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import _common
from bench.deploy import THREADS, front_rows, retimed_as_evaluate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished searches' run directories")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/retime.json"), help="JSON output")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    report = _common.environment(_common.command_line("retime", argv), [0])
    start = time.perf_counter()
    report["runs"] = {run: retimed_as_evaluate(run, front_rows(run)) for run in args.runs}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    _common.write_json(args.out, report)
    for run, checks in report["runs"].items():
        agree = sum(check["agrees"] for check in checks)
        print(f"{run}: {agree} of {len(checks)} re-timings agree with the recorded spread")
        for check in checks:
            print("  ", json.dumps(check))
    print(f"wrote {args.out} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
