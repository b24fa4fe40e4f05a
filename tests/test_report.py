"""The run report: HTML, Markdown and PNG files built from hand-made results tables, and its error cases.

Chromium checks (marked slow) open the page as a user would, offline, and look for drawn plots and no
script errors; they are skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from orchestrator.artifacts.tables import PARETO_SCHEMA, TRIALS_SCHEMA, ResultsError, write_table
from orchestrator.report import ReportPaths, format_front_table, write_report
from orchestrator.report._compare import fmt_change, fmt_speed, speed_spread
from orchestrator.report._data import load_run
from orchestrator.report._figures import front_figure
from orchestrator.report._png import front_plot
from orchestrator.report._points import hover_text
from orchestrator.report._policy import layer_table, summary
from tests.waiting import HANG_S

CHROMIUM = Path("/usr/bin/chromium")
BASE_SIZE, BASE_LATENCY = 71_680, 0.84

RUN_INFO = {
    "workload": "digits",
    "metric": "accuracy",
    "objectives": ["validation", "size_bytes", "latency_ms"],
    "directions": ["maximize", "minimize", "minimize"],
    "baseline": {
        "validation": 0.975,
        "test": 0.9694,
        "size_bytes": BASE_SIZE,
        "latency_ms": BASE_LATENCY,
        "flops": 1_210_000,
        "params": 17_900,
    },
    "max_accuracy_drop": 0.05,
    "num_trials": 16,
    "sampler": "nsga2",
    "seed": 0,
    "asha": True,
    "wall_s": 252.4,
    "device": "cpu",
    "threads": 4,
    "versions": {"torch": "2.14.1", "ray": "2.60.0", "optuna": "5.0.0"},
    "started": "2026-01-02T10:00:00",
    "finished": "2026-01-02T10:04:12",
}


def policy(*steps: tuple[str, dict], name: str | None = None) -> str:
    doc = {"name": name} if name else {}
    doc |= {
        "_type": "policy",
        "_version": 1,
        "seed": 0,
        "steps": [{"_type": kind, "_version": 1, "_data": data} for kind, data in steps],
    }
    return json.dumps(doc, sort_keys=True)


QUANT8 = ("quantization", {"bits": {"_default": 8}, "group_size": None, "activation_bits": None, "kernel": "auto"})
QUANT4 = (
    "quantization",
    {"bits": {"_default": 4, "fc2": 8}, "group_size": None, "activation_bits": None, "kernel": "auto"},
)
PRUNE = ("unstructured_pruning", {"sparsity": {"conv1": 0.5, "re:fc.*": 0.8}, "scope": "layer"})
LOWRANK = ("lowrank", {"rank": {"fc1": 0.5, "conv2": "energy:0.9", "_default": None}, "conv_method": "tucker"})
STRUCT = ("structured_pruning", {"ratio": {"conv2": 0.25}, "importance": "l2", "round_to": None})
KD = ("distillation", {"temperature": 4.0, "alpha": 0.7, "epochs": 2})


def trial(
    number: int,
    role: str = "search",
    status: str = "completed",
    *,
    feasible: bool = True,
    pareto: bool = False,
    validation: float | None = 0.95,
    size: int | None = 30_000,
    latency: float | None = 0.5,
    steps: tuple = (QUANT8, KD),
    name: str | None = None,
) -> dict:
    names = [s[0] for s in steps]
    return {
        "trial_id": f"t{number:03d}" if role == "search" else f"{role}-{number}",
        "number": number,
        "role": role,
        "status": status,
        "feasible": feasible,
        "pareto": pareto,
        "validation": validation,
        "size_bytes": size,
        "latency_ms": latency,
        "flops": 900_000 if size else None,
        "params": 17_900,
        "compression_ratio": BASE_SIZE / size if size else None,
        "speedup": BASE_LATENCY / latency if latency else None,
        "epochs_completed": 2,
        "wall_s": 12.0,
        "device": "cpu",
        "node_id": "n1",
        "techniques": ",".join(names),
        "policy_json": policy(*steps, name=name),
        "kernels_json": "{}",
        "error": "boom: out of memory" if status == "failed" else None,
    }


def make_trials() -> list[dict]:
    return [
        trial(0, "baseline", validation=0.975, size=BASE_SIZE, latency=BASE_LATENCY, steps=()),
        trial(1, "reference", validation=0.9712, size=19_200, latency=0.61, steps=(QUANT8,), name="uniform int8"),
        # below the accuracy-drop limit (0.975 − 0.05): infeasible, yet listed and drawn, marked as such
        trial(
            2,
            "reference",
            feasible=False,
            validation=0.92,
            size=10_400,
            latency=0.58,
            steps=(QUANT4,),
            name="uniform 4-bit",
        ),
        trial(3, pareto=True, validation=0.9689, size=12_595, latency=0.41, steps=(PRUNE, QUANT8, KD)),
        trial(4, pareto=True, validation=0.9533, size=6_150, latency=0.37, steps=(LOWRANK, STRUCT, QUANT4, KD)),
        trial(5, pareto=True, validation=0.9741, size=22_010, latency=0.52, steps=(PRUNE, KD)),
        trial(6, validation=0.9402, size=15_300, latency=0.66),
        trial(7, validation=0.9310, size=28_100, latency=0.72),
        trial(8, validation=0.9555, size=40_200, latency=0.69),
        trial(9, feasible=False, validation=0.80, size=4_900, latency=0.35, steps=(LOWRANK, QUANT4, KD)),
        trial(10, status="failed", validation=None, size=None, latency=None),
        trial(11, status="stopped_early", validation=0.71, size=9_800, latency=0.45),
    ]


COLUMNS = [
    "trial",
    "test accuracy",
    "validation accuracy",
    "size",
    "Δ test",
    "Δ validation",
    "compression",
    "latency",
    "speed",
    "FLOPs",
    "techniques",
    "role",
    "checkpoint",
]


def make_front(trials: list[dict], checkpoints: dict[str, str]) -> list[dict]:
    tests = {"t003": 0.9655, "t004": 0.9477, "t005": 0.9702}
    return [
        {**t, "test": tests[t["trial_id"]], "checkpoint": checkpoints[t["trial_id"]]} for t in trials if t["pareto"]
    ]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with 12 trials and a 3-point front: one relative, one absolute, one missing checkpoint."""
    run = tmp_path / "run"
    absolute = tmp_path / "elsewhere" / "t005"
    checkpoints = {"t003": "checkpoints/t003", "t004": "checkpoints/t004", "t005": str(absolute)}
    for directory in (run / "checkpoints" / "t003", absolute):
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_text("{}")
    trials = make_trials()
    info = {**RUN_INFO, "run_dir": str(run)}
    write_table(trials, TRIALS_SCHEMA, str(run), "trials.parquet", info)
    write_table(make_front(trials, checkpoints), PARETO_SCHEMA, str(run), "pareto.parquet", info)
    return run


class _TableRows(HTMLParser):
    """Rows of the front table: trial id → list of (data-value or None, text) per cell."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[tuple[str | None, str]]] = {}
        self._row: str | None = None
        self._cell: list | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and "data-trial-id" in attributes:
            self._row = attributes["data-trial-id"]
            self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = [attributes.get("data-value"), ""]

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1] += " " + data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self.rows[self._row].append((self._cell[0], " ".join(self._cell[1].split())))
            self._cell = None
        elif tag == "tr":
            self._row = None


def table_rows(html: str) -> dict[str, list[tuple[str | None, str]]]:
    parser = _TableRows()
    parser.feed(html)
    return parser.rows


@pytest.fixture
def report(run_dir: Path) -> ReportPaths:
    return write_report(str(run_dir))


def test_html_table_matches_pareto_table(run_dir: Path, report: ReportPaths) -> None:
    html = Path(report.html).read_text()
    rows = table_rows(html)
    # the baseline, the references (smallest first), then the front, smallest model first
    assert list(rows) == ["baseline", "reference-2", "reference-1", "t004", "t003", "t005"]
    for front in make_front(make_trials(), {"t003": "", "t004": "", "t005": ""}):
        cells = rows[front["trial_id"]]
        test, validation, size = (cells[i][0] for i in (1, 2, 3))
        assert float(test) == front["test"] and float(validation) == front["validation"]
        assert int(size) == front["size_bytes"]
    assert rows["t003"][3][1] == "12.3 KiB" and rows["t003"][COLUMNS.index("compression")][1] == "5.69×"
    assert rows["t003"][-1][1] == "checkpoints/t003"
    assert rows["t004"][-1][1] == "checkpoints/t004 checkpoint missing"
    assert rows["t005"][-1][1] == str(run_dir.parent / "elsewhere" / "t005")
    assert html.count("checkpoint missing") == 1
    for fact in ("digits", "nsga2", "4 min 12 s", "torch 2.14.1", "validation ↑ · size_bytes ↓ · latency_ms ↓"):
        assert fact in html
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]


def test_summary_markdown_and_png(run_dir: Path, report: ReportPaths) -> None:
    text = Path(report.summary).read_text()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"t003", "t004", "t005", "baseline", "uniform int8", "uniform 4-bit"} <= set(lines)
    assert "| 0.9655 | 0.9689 | 12.3 KiB | −0.39 pt | −0.61 pt | 5.69× |" in lines["t003"]
    assert "| 0.9477 | 0.9533 | 6.01 KiB |" in lines["t004"] and "checkpoint missing" in lines["t004"]
    assert "checkpoint missing" not in lines["t003"] + lines["t005"]
    assert "](front.png)" in text
    png = Path(report.png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels.std() > 0.05 and len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50


NETWORK_PATTERNS = [
    r"<script\b[^>]*\bsrc\s*=",  # any external script (plotly.js must be inlined)
    r"<link\b[^>]*\bhref\s*=",  # stylesheets, fonts, icons
    r"<(?:img|iframe|embed|source|video|audio)\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//",
    r"url\(\s*[\"']?(?:https?:)?//",  # CSS urls
    r"@import",
]


def test_html_references_no_network_resource(report: ReportPaths) -> None:
    """The rule: no tag or CSS rule that makes the browser fetch something. Plotly.js's own source mentions
    URLs in comments and strings, so we look for loading constructs rather than every 'http' substring."""
    html = Path(report.html).read_text()
    for pattern in NETWORK_PATTERNS:
        assert not re.search(pattern, html, re.IGNORECASE), pattern
    assert html.count("* plotly.js v") == 1  # inlined exactly once
    assert html.count('class="plotly-graph-div"') == 2 + 4  # two trade-off plots, four heat maps


def test_console_table_aligns_numbers() -> None:
    front = make_front(make_trials(), {"t003": "checkpoints/t003", "t004": "checkpoints/t004", "t005": "c/t005"})
    text = format_front_table(front, RUN_INFO, notes={"t004": "checkpoint missing"}, trials=make_trials())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["trial", "test", "accuracy"] and set(lines[1]) == {"-", " "}
    labels = [line[: lines[1].index(" ")].rstrip() for line in lines[2:]]
    assert labels == ["baseline", "uniform 4-bit", "uniform int8", "t004", "t003", "t005"]
    size_end = lines[0].index("size") + len("size")
    assert {line[:size_end].rstrip()[-3:] for line in lines[2:]} == {"KiB"}  # right-aligned under "size"
    assert "checkpoints/t004 (checkpoint missing)" in text
    without_trials = format_front_table(front, RUN_INFO)  # the front alone: no reference rows
    assert "uniform" not in without_trials and len(without_trials.splitlines()) == 2 + 4


def test_policy_layer_table_and_summary() -> None:
    policies = [policy(LOWRANK, QUANT4), policy(PRUNE), policy(QUANT8)]
    bits = layer_table("quantization bits", policies)
    assert bits.columns == ["fc2", "_default"] and bits.values == [[8, 4], [None, None], [None, 8]]
    sparsity = layer_table("unstructured sparsity", policies)
    assert sparsity.columns == ["conv1", "re:fc.*"] and sparsity.values[1] == [0.5, 0.8]
    rank = layer_table("low-rank rank", policies)
    assert rank.columns == ["conv2", "fc1"] and rank.values[0] == ["energy:0.9", 0.5]
    assert layer_table("quantization bits", [policy(("quantization", {"bits": {"l10": 4, "l2": 8}}))]).columns == [
        "l2",
        "l10",
    ]
    assert summary(policy(QUANT4))[0] == "quantization: bits{_default=4, fc2=8} kernel=auto"
    assert summary("not json") == []


def test_regenerates_without_checkpoints_and_from_uri(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir.parent / "elsewhere")
    paths = write_report(run_dir.as_uri())
    assert paths.html == f"{run_dir.as_uri()}/report.html"
    html = (run_dir / "report.html").read_text()
    assert [cells[-1][1].endswith("checkpoint missing") for cells in table_rows(html).values()] == [
        False,  # baseline
        False,  # the references have no checkpoint
        False,
        True,
        True,
        True,
    ]
    assert (run_dir / "summary.md").read_text().count("checkpoint missing") == 3


def test_minimal_metadata_and_no_pareto_table(tmp_path: Path) -> None:
    """Missing run facts read n/a; without pareto.parquet the front comes from the trials' Pareto flags."""
    trials = [trial(0, "baseline", size=70_000, latency=None, steps=()), trial(3, pareto=True, latency=None)]
    write_table(trials, TRIALS_SCHEMA, str(tmp_path), "trials.parquet", {})
    html = Path(write_report(str(tmp_path)).html).read_text()
    assert list(table_rows(html)) == ["t003"] and "pareto.parquet is missing" in html
    assert "<dd>n/a</dd>" in html and "no checkpoint recorded" in html
    assert html.count('class="plotly-graph-div"') == 2  # no latency plot without latencies; one heat map


def md_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows: first cell → all cells."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split(" | ")] for line in text.splitlines() if line.startswith("| ")
    ]
    return {cells[0]: cells for cells in rows}


def console_rows(text: str) -> dict[str, list[str]]:
    """Console table rows: first column → cells, cut at the columns the rule under the header marks."""
    lines = text.splitlines()
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", lines[1])]
    rows = [[line[a:b].strip() for a, b in spans] for line in [lines[0], *lines[2:]]]
    return {cells[0]: cells for cells in rows}


def all_tables(run_dir: Path, report: ReportPaths) -> dict[str, dict[str, list[str]]]:
    """Row label → cell texts (in COLUMNS order) of the HTML, Markdown and console tables of the same run."""
    html = {cells[0][1]: [text for _, text in cells] for cells in table_rows(Path(report.html).read_text()).values()}
    console = format_front_table(
        make_front(make_trials(), {"t003": "c", "t004": "c", "t005": "c"}), RUN_INFO, trials=make_trials()
    )
    return {"html": html, "markdown": md_rows(Path(report.summary).read_text()), "console": console_rows(console)}


def test_reference_rows_are_named_and_marked(run_dir: Path, report: ReportPaths) -> None:
    html = Path(report.html).read_text()
    assert '<tr data-trial-id="reference-1" class="reference">' in html
    assert '<tr data-trial-id="baseline" class="baseline">' in html
    role = COLUMNS.index("role")
    for kind, rows in all_tables(run_dir, report).items():
        assert rows["uniform int8"][role] == "reference", kind  # the policy's name labels the row
        assert rows["uniform 4-bit"][role] == "reference · infeasible", kind
        assert rows["baseline"][role] == "baseline" and rows["t003"][role] == "Pareto", kind
        assert "reference-1" not in rows and "reference-2" not in rows, kind


def test_a_reference_on_the_front_is_listed_once_with_its_trial_id() -> None:
    trials = make_trials()
    front = make_front(trials, {"t003": "c3", "t004": "c4", "t005": "c5"})
    front.append({**trials[1], "pareto": True, "test": 0.968, "checkpoint": "pareto/reference-1"})
    rows = console_rows(format_front_table(front, RUN_INFO, trials=trials))
    assert list(rows)[1:] == ["baseline", "uniform 4-bit", "t004", "t003", "reference-1", "t005"]
    assert rows["reference-1"][COLUMNS.index("role")] == "Pareto · reference (uniform int8)"


def test_metric_change_columns(run_dir: Path, report: ReportPaths) -> None:
    """Δ test and Δ validation: the change from the baseline (test 0.9694, validation 0.975) in points."""
    expected = {
        "baseline": ["—", "—"],
        "uniform int8": ["n/a", "−0.38 pt"],  # references have no test metric
        "uniform 4-bit": ["n/a", "−5.50 pt"],
        "t004": ["−2.17 pt", "−2.17 pt"],
        "t003": ["−0.39 pt", "−0.61 pt"],
        "t005": ["+0.08 pt", "−0.09 pt"],
    }
    columns = [COLUMNS.index("Δ test"), COLUMNS.index("Δ validation")]
    for kind, rows in all_tables(run_dir, report).items():
        assert rows["trial"][columns[0]] == "Δ test" if kind != "html" else True
        assert {label: [rows[label][i] for i in columns] for label in expected} == expected, kind
    assert 'data-value="-0.006099999999999994"' in Path(report.html).read_text()  # the exact number, unrounded
    assert fmt_change(0.975, 0.975) == "0.00 pt" and fmt_change(0.97501, 0.975) == "0.00 pt"
    assert fmt_change(12.5, 10.0) == "+2.5000" and fmt_change(None, 0.9) == "n/a"


@pytest.mark.parametrize(
    ("speedup", "spread", "words"),
    [
        (0.91, None, "1.10× slower"),
        (1.25, None, "1.25× faster"),
        (1.04, None, "about the same speed"),
        (0.96, None, "about the same speed"),
        (1.0, None, "about the same speed"),
        (1.06, None, "1.06× faster"),
        (0.5, None, "2.00× slower"),
        (1.08, (0.97, 1.2), "no measurable change"),
        (0.9, (0.8, 1.0), "no measurable change"),
        (1.03, (1.01, 1.05), "1.03× faster"),  # a measured spread overrides the ±5 % rule
        (0.8, (0.75, 0.85), "1.25× slower"),
        (None, None, "n/a"),
    ],
)
def test_speed_in_words(speedup: float | None, spread: tuple[float, float] | None, words: str) -> None:
    assert fmt_speed(speedup, spread) == words


def test_speed_rule_is_documented_and_spreads_are_read() -> None:
    assert "±5 %" in (fmt_speed.__doc__ or "") and "no measurable change" in (fmt_speed.__doc__ or "")
    base = RUN_INFO["baseline"]
    assert speed_spread({"speedup_low": 1.1, "speedup_high": 0.9}, base) == (0.9, 1.1)
    assert speed_spread({"latency_ms": 0.5}, base) is None  # nothing measured a spread
    low, high = speed_spread({"latency_ms": 0.5, "latency_p10_ms": 0.4, "latency_p90_ms": 0.6}, base)
    assert (low, high) == pytest.approx((0.84 / 0.6, 0.84 / 0.4))
    low, high = speed_spread({"latency_ms": 0.8}, {**base, "latency_p10_ms": 0.7, "latency_p90_ms": 0.9})
    assert (low, high) == pytest.approx((0.7 / 0.8, 0.9 / 0.8))


def test_slower_models_read_slower_in_tables_and_hover() -> None:
    """0.84 ms baseline: 0.923 ms is 1.10× slower, 0.672 ms 1.25× faster, 0.8077 ms about the same; a spread
    from the row (`speedup_low`/`speedup_high`, optional columns) turns a 1.08× into no measurable change."""
    rows = [
        {**trial(20, pareto=True, latency=0.923, size=1_000), "test": 0.95},
        {**trial(21, pareto=True, latency=0.672, size=2_000), "test": 0.95},
        {**trial(22, pareto=True, latency=0.8077, size=3_000), "test": 0.95},
        {
            **trial(23, pareto=True, latency=0.84 / 1.08, size=4_000),
            "test": 0.95,
            "speedup_low": 0.97,
            "speedup_high": 1.2,
        },
    ]
    table = console_rows(format_front_table(rows, RUN_INFO))
    speed = COLUMNS.index("speed")
    assert [table[f"t0{n}"][speed] for n in (20, 21, 22, 23)] == [
        "1.10× slower",
        "1.25× faster",
        "about the same speed",
        "no measurable change",
    ]
    hovers = [hover_text(row, RUN_INFO) for row in rows]
    assert "latency: 0.923 ms (1.10× slower)" in hovers[0] and "faster" not in hovers[0]
    assert "(1.25× faster)" in hovers[1] and "(about the same speed)" in hovers[2]
    assert "(no measurable change)" in hovers[3]
    bigger = hover_text({**rows[0], "size_bytes": 80_000, "compression_ratio": BASE_SIZE / 80_000}, RUN_INFO)
    assert "size: 78.1 KiB (1.12× larger)" in bigger and "smaller" not in bigger


MIB = 1024 * 1024
DECIMAL_UNITS = re.compile(r"(?<![A-Za-z])(kB|KB|MB|GB|TB)(?![A-Za-z])")


def sized_run(path: Path, sizes: list[int]) -> Path:
    """A run whose baseline is 3 MiB and whose trials have the given sizes (the first two on the front)."""
    base = {**RUN_INFO["baseline"], "size_bytes": 3 * MIB}
    trials = [trial(0, "baseline", validation=0.975, size=3 * MIB, latency=BASE_LATENCY, steps=())]
    trials += [
        {**trial(n + 1, pareto=n < 2, validation=0.96 - 0.002 * n, size=s), "compression_ratio": 3 * MIB / s}
        for n, s in enumerate(sizes)
    ]
    info = {**RUN_INFO, "baseline": base}
    write_table(trials, TRIALS_SCHEMA, str(path), "trials.parquet", info)
    front = [{**t, "test": 0.95, "checkpoint": None} for t in trials if t["pareto"]]
    write_table(front, PARETO_SCHEMA, str(path), "pareto.parquet", info)
    return path


def without_plotly_js(html: str) -> str:
    """The page minus the inlined plotly.js library (whose source mentions kB and MB in its own strings)."""
    parts = html.split("</script>")
    assert sum("* plotly.js v" in part for part in parts) == 1
    return "</script>".join(part for part in parts if "* plotly.js v" not in part)


@pytest.mark.parametrize("sizes", [[300 * 1024, 700 * 1024, MIB + 512 * 1024], [720 * 1024, 2 * MIB, 1_500_000]])
def test_sizes_are_binary_everywhere(tmp_path: Path, sizes: list[int]) -> None:
    """Sizes spanning KiB and MiB: a log axis (first case) and a linear one (second) both tick in KiB/MiB, and
    no page, summary or console table says kB or MB."""
    run_dir = sized_run(tmp_path / "run", sizes)
    paths = write_report(str(run_dir))
    run = load_run(str(run_dir))
    texts = {
        "report.html": without_plotly_js(Path(paths.html).read_text()),
        "summary.md": Path(paths.summary).read_text(),
        "console": format_front_table(run.front, run.run_info, trials=run.trials),
    }
    for name, text in texts.items():
        assert not DECIMAL_UNITS.search(text), (name, DECIMAL_UNITS.search(text))
        assert "KiB" in text and "MiB" in text, name
    axis = front_figure(run, "size_bytes").layout.xaxis
    assert axis.ticktext and all(re.fullmatch(r"[\d.]+ (KiB|MiB)", t) for t in axis.ticktext), axis.ticktext
    log = max(sizes + [3 * MIB]) / min(sizes) >= 8
    assert axis.type == ("log" if log else "linear")
    assert {t.split()[1] for t in axis.ticktext} == ({"KiB", "MiB"} if log else {"MiB"})  # 1 MiB, 1.5 MiB, ...
    fig = front_plot(run)
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(re.fullmatch(r"[\d.]+ (KiB|MiB)", t) for t in ticks), ticks


def test_infeasible_trials_are_marked_and_never_on_the_front(run_dir: Path) -> None:
    """t009 is over the accuracy-drop limit and pareto.parquet claims it anyway (a damaged or hand-edited
    table): the report drops it from the front with a warning and draws it as infeasible; the infeasible
    reference stays in every table, marked."""
    trials = make_trials()
    front = make_front(trials, {"t003": "c3", "t004": "c4", "t005": "c5"}) + [{**trials[9], "test": 0.79}]
    write_table(front, PARETO_SCHEMA, str(run_dir), "pareto.parquet", {**RUN_INFO, "run_dir": str(run_dir)})
    run = load_run(str(run_dir))
    assert [r["trial_id"] for r in run.front] == ["t003", "t004", "t005"]
    assert run.warnings == ["infeasible trials flagged as Pareto-optimal are not shown on the front: t009"]
    fig = front_figure(run, "size_bytes")
    traces = {t.name: t for t in fig.data if t.name}
    assert list(traces["infeasible (over accuracy-drop limit) (1)"].x) == [4_900]
    assert 4_900 not in traces["Pareto front (3)"].x and 4_900 not in [
        x for t in fig.data if t.mode == "lines" for x in t.x
    ]
    assert "(search, completed, infeasible)" in traces["infeasible (over accuracy-drop limit) (1)"].hovertext[0]
    assert "uniform 4-bit (infeasible)" in [a.text for a in fig.layout.annotations]
    legend = [t.get_text() for t in front_plot(run).legends[0].get_texts()]
    assert "infeasible (over accuracy-drop limit) (1)" in legend and "Pareto front (3)" in legend
    paths = write_report(str(run_dir))
    html = Path(paths.html).read_text()
    assert "t009" not in table_rows(html) and "not shown on the front: t009" in html
    assert '<td class="role infeasible">reference · infeasible</td>' in html
    assert "| reference · infeasible |" in Path(paths.summary).read_text()
    (run_dir / "pareto.parquet").unlink()  # the fallback reads the trials' flags: the same rule holds
    write_table(
        [{**t, "pareto": t["pareto"] or t["trial_id"] == "t009"} for t in trials],
        TRIALS_SCHEMA,
        str(run_dir),
        "trials.parquet",
        RUN_INFO,
    )
    assert [r["trial_id"] for r in load_run(str(run_dir)).front] == ["t003", "t004", "t005"]


def one_line_error(run_dir: Path) -> str:
    with pytest.raises(ResultsError) as info:
        write_report(str(run_dir))
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_errors_are_one_line(tmp_path: Path) -> None:
    assert "does not exist" in one_line_error(tmp_path)
    (tmp_path / "trials.parquet").write_bytes(b"PAR1 this is not parquet at all \x00\x01")
    assert "not a readable Parquet file" in one_line_error(tmp_path)
    unfinished = [trial(1, status="failed"), trial(2, status="stopped_early")]
    write_table(unfinished, TRIALS_SCHEMA, str(tmp_path / "run"), "trials.parquet", RUN_INFO)
    assert one_line_error(tmp_path / "run") == f"no finished trials in {tmp_path / 'run'}"
    assert not (tmp_path / "run" / "report.html").exists()


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (CI installs it)")
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_S, check=True)


@pytest.mark.slow
def test_chromium_screenshot_is_not_blank(report: ReportPaths, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    chromium(
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        Path(report.html).as_uri(),
        profile=tmp_path / "profile",
    )
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    front_blue = np.abs(pixels - np.array([0x00, 0x72, 0xB2]) / 255).max(axis=-1) < 0.03
    assert front_blue.sum() > 300  # the front's markers and step lines were drawn


def dump_dom(page: Path, profile: Path) -> str:
    return chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), profile=profile).stdout


def body_tag(dom: str) -> str:
    """The opening <body ...> tag of a dumped DOM (after </head>, so no script text can match)."""
    return re.search(r"<body[^>]*>", dom.split("</head>", 1)[1]).group(0)


@pytest.mark.slow
def test_chromium_draws_plots_without_script_errors(report: ReportPaths, tmp_path: Path) -> None:
    page = Path(report.html)
    dom = dump_dom(page, tmp_path / "profile")
    assert dom.count('class="main-svg"') >= 2 * 6  # plotly draws two svg layers per figure
    assert body_tag(dom) == "<body>"
    labels = ("uniform int8", "uniform 4-bit (infeasible)", "baseline", "accuracy-drop limit")
    for label in labels:  # labelled markers, both plots
        assert len(re.findall(rf"<text[^>]*>{re.escape(label)}</text>", dom)) == 2, label
    broken = tmp_path / "broken.html"  # the hook must notice a failing script, or the check above means nothing
    broken.write_text(page.read_text().replace("</body>", "<script>undefinedFunction();</script></body>"))
    assert "undefinedFunction" in body_tag(dump_dom(broken, tmp_path / "p2"))
