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
from orchestrator.report._policy import layer_table, summary

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
        trial(1, "reference", validation=0.9712, size=19_200, latency=0.61, steps=(QUANT8,), name="int8"),
        trial(2, "reference", validation=0.92, size=10_400, latency=0.58, steps=(QUANT4,)),
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
    assert list(rows) == ["baseline", "t004", "t003", "t005"]  # baseline first, then smallest model first
    for front in make_front(make_trials(), {"t003": "", "t004": "", "t005": ""}):
        cells = rows[front["trial_id"]]
        test, validation, size = (cells[i][0] for i in (1, 2, 3))
        assert float(test) == front["test"] and float(validation) == front["validation"]
        assert int(size) == front["size_bytes"]
    assert rows["t003"][3][1] == "12.3 KiB" and rows["t003"][4][1] == "5.69×"
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
    assert {"t003", "t004", "t005", "baseline"} <= set(lines)
    assert "| 0.9655 | 0.9689 | 12.3 KiB | 5.69× |" in lines["t003"]
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
    text = format_front_table(front, RUN_INFO, notes={"t004": "checkpoint missing"})
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["trial", "test", "accuracy"] and set(lines[1]) == {"-", " "}
    assert [line.split()[0] for line in lines[2:]] == ["baseline", "t004", "t003", "t005"]
    size_end = lines[0].index("size") + len("size")
    assert {line[:size_end].rstrip()[-3:] for line in lines[2:]} == {"KiB"}  # right-aligned under "size"
    assert "checkpoints/t004 (checkpoint missing)" in text


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
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


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
    for label in ("int8", "reference-2", "baseline", "accuracy-drop limit"):  # labelled markers, both plots
        assert len(re.findall(rf"<text[^>]*>{label}</text>", dom)) == 2, label
    broken = tmp_path / "broken.html"  # the hook must notice a failing script, or the check above means nothing
    broken.write_text(page.read_text().replace("</body>", "<script>undefinedFunction();</script></body>"))
    assert "undefinedFunction" in body_tag(dump_dom(broken, tmp_path / "p2"))
