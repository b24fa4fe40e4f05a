"""Labels of the baseline and the reference policies stay readable when their points nearly coincide: the
computed positions, report.html as Chromium draws it, and front.png as matplotlib draws it."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from matplotlib.text import Text

from orchestrator.artifacts.tables import PARETO_SCHEMA, TRIALS_SCHEMA, write_table
from orchestrator.report import write_report
from orchestrator.report._data import RunData, load_run
from orchestrator.report._figures import PLOT_AREA, front_figure, label_boxes
from orchestrator.report._labels import Box, Frame, overlapping, place
from orchestrator.report._png import LABEL_GID, front_plot
from orchestrator.report._points import labelled_points, plot_limits
from tests.test_report import KD, PRUNE, QUANT4, QUANT8, RUN_INFO, chromium, trial

NAMES = ["baseline", "uniform int8", "uniform 4-bit", "50% sparse + int8"]
Rect = tuple[float, float, float, float]  # left, bottom, right, top (or left, top, right, bottom)


def crowded_trials() -> list[dict]:
    """Three references within a few hundred bytes, 0.1 ms and 0.1 point of each other, and a baseline whose
    latency (not size) is in the same spot: every label wants the same place in the latency plot."""
    return [
        trial(0, "baseline", validation=0.975, size=71_680, latency=0.615, steps=()),
        trial(1, "reference", validation=0.9712, size=19_200, latency=0.610, steps=(QUANT8,), name="uniform int8"),
        trial(2, "reference", validation=0.9705, size=19_000, latency=0.605, steps=(QUANT4,), name="uniform 4-bit"),
        trial(
            3,
            "reference",
            validation=0.9709,
            size=19_100,
            latency=0.612,
            steps=(PRUNE, QUANT8),
            name="50% sparse + int8",
        ),
        trial(4, pareto=True, validation=0.9689, size=12_595, latency=0.41, steps=(PRUNE, QUANT8, KD)),
        trial(5, pareto=True, validation=0.9533, size=6_150, latency=0.37, steps=(QUANT4, KD)),
        trial(6, validation=0.9402, size=15_300, latency=0.66),
    ]


@pytest.fixture
def crowded(tmp_path: Path) -> Path:
    run = tmp_path / "crowded"
    trials = crowded_trials()
    info = {**RUN_INFO, "baseline": {**RUN_INFO["baseline"], "latency_ms": 0.615}, "run_dir": str(run)}
    write_table(trials, TRIALS_SCHEMA, str(run), "trials.parquet", info)
    front = [{**t, "test": 0.96, "checkpoint": None} for t in trials if t["pareto"]]
    write_table(front, PARETO_SCHEMA, str(run), "pareto.parquet", info)
    return run


def intersect(a: Rect, b: Rect) -> bool:
    """Whether two axis-aligned rectangles share area (touching edges do not count)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def sizes(frame: Frame, steps: int = 12) -> list[tuple[float, float]]:
    """A grid of plot-area sizes spanning the frame, ends included."""
    widths = [frame.width[0] + (frame.width[1] - frame.width[0]) * i / steps for i in range(steps + 1)]
    heights = [frame.height[0] + (frame.height[1] - frame.height[0]) * i / steps for i in range(steps + 1)]
    return list(itertools.product(widths, heights))


def clashes(boxes: list[Box], frame: Frame) -> list[tuple[int, int, float, float]]:
    """Every pair of boxes that intersects at some size on a grid over the frame (checked without `apart`)."""
    return [
        (i, j, w, h)
        for w, h in sizes(frame)
        for i, j in itertools.combinations(range(len(boxes)), 2)
        if intersect(boxes[i].edges(w, h), boxes[j].edges(w, h))
    ]


# (a) the positions the report computes


@pytest.mark.parametrize("x", ["size_bytes", "latency_ms"])
def test_computed_label_boxes_never_intersect(crowded: Path, x: str) -> None:
    run = load_run(str(crowded))
    points = labelled_points(run, x)
    assert [p.text for p in points] == NAMES
    boxes = label_boxes(run, x, plot_limits(run, x))
    assert overlapping(boxes, PLOT_AREA) == []
    assert clashes(boxes, PLOT_AREA) == []
    markers = [Box(b.fx, b.fy, p.style.size, p.style.size) for b, p in zip(boxes, points, strict=True)]
    assert not [
        (label, marker)
        for (w, h), label, marker in itertools.product(sizes(PLOT_AREA, 4), boxes, markers)
        if intersect(label.edges(w, h), marker.edges(w, h))
    ]  # no label hides a labelled point


def test_place_separates_labels_on_one_spot() -> None:
    """Four labels anchored on the very same point, at a size range as wide as a phone to a wide screen."""
    frame = Frame(width=(200, 1400), height=(150, 400))
    labels = [Box(0.5, 0.5, 9.0 * len(name), 18) for name in NAMES]
    placed = place(labels, [Box(0.5, 0.5, 15, 15)], frame, [7.5] * 4)
    assert clashes(placed, frame) == [] and overlapping(placed, frame) == []
    assert all(abs(b.dx) + abs(b.dy) < 120 for b in placed)  # near their point, not thrown across the plot


# (b) report.html as Chromium draws it, at three window widths

# Runs after plotly has drawn: writes each trade-off plot's annotation boxes (text, page rectangle) into the DOM.
PROBE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var plots = {};
  document.querySelectorAll("div.js-plotly-plot[id^='front-']").forEach(function (div) {
    var found = [];
    div.querySelectorAll("g.annotation").forEach(function (g) {
      var r = (g.querySelector("rect.bg") || g).getBoundingClientRect();
      found.push([g.textContent, r.left, r.top, r.right, r.bottom]);
    });
    var ticks = [];
    div.querySelectorAll("g.xtick text").forEach(function (t) { ticks.push(t.textContent); });
    var area = div.getBoundingClientRect();
    plots[div.id] = {labels: found, ticks: ticks, area: [area.left, area.top, area.right, area.bottom]};
  });
  var out = document.createElement("pre");
  out.id = "label-probe";
  out.textContent = JSON.stringify(plots);
  document.body.appendChild(out);
}, 200); });
</script></body>"""


def drawn_labels(page: Path, width: int, profile: Path) -> dict:
    dom = chromium(
        f"--window-size={width},2400", "--virtual-time-budget=8000", "--dump-dom", page.as_uri(), profile=profile
    ).stdout
    found = re.search(r'<pre id="label-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run"
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


@pytest.mark.slow
@pytest.mark.parametrize("width", [1280, 900, 520])
def test_chromium_draws_labels_apart(crowded: Path, tmp_path: Path, width: int) -> None:
    page = Path(write_report(str(crowded)).html)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE))
    plots = drawn_labels(probed, width, tmp_path / "profile")
    assert set(plots) == {"front-size_bytes", "front-latency_ms"}
    for plot, drawn in plots.items():
        boxes = drawn["labels"]
        assert sorted(text for text, *_ in boxes) == sorted([*NAMES, "accuracy-drop limit"]), plot
        assert all(right - left > 10 and bottom - top > 8 for _, left, top, right, bottom in boxes)
        left, top, right, bottom = drawn["area"]
        assert all(left <= b[1] and top <= b[2] and b[3] <= right and b[4] <= bottom for b in boxes), plot  # unclipped
        overlaps = [(a[0], b[0]) for a, b in itertools.combinations(boxes, 2) if intersect(a[1:], b[1:])]
        assert overlaps == [], f"{plot} at {width} px: {overlaps}"
    size_ticks = plots["front-size_bytes"]["ticks"]
    assert size_ticks and all(re.fullmatch(r"[\d.]+ (KiB|MiB)", t) for t in size_ticks), size_ticks


# (c) front.png as matplotlib draws it


def test_png_label_extents_never_overlap(crowded: Path) -> None:
    run: RunData = load_run(str(crowded))
    fig = front_plot(run)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 2
    for ax in panels:
        labels = [t for t in ax.texts if t.get_gid() == LABEL_GID]
        assert sorted(t.get_text() for t in labels) == sorted(NAMES)
        extents = [Text.get_window_extent(t, renderer) for t in labels]  # an Annotation's own adds its line
        backgrounds = [t.get_bbox_patch().get_window_extent(renderer) for t in labels]
        for boxes in (extents, backgrounds):
            rects = [(b.x0, b.y0, b.x1, b.y1) for b in boxes]
            assert not [pair for pair in itertools.combinations(rects, 2) if intersect(*pair)], ax.get_xlabel()
        figure = fig.bbox
        assert all(figure.x0 <= b.x0 and b.x1 <= figure.x1 and figure.y0 <= b.y0 and b.y1 <= figure.y1 for b in extents)
    size_ticks = [t.get_text() for t in panels[0].get_xticklabels() if t.get_text()]
    assert size_ticks and all(re.fullmatch(r"[\d.]+ (KiB|MiB)", t) for t in size_ticks), size_ticks


def test_interactive_figure_carries_the_labels(crowded: Path) -> None:
    """The plotly figure names each point once, as an annotation, with a line back to its point."""
    run = load_run(str(crowded))
    fig = front_figure(run, "latency_ms")
    texts = [a.text for a in fig.layout.annotations]
    assert sorted(texts) == sorted([*NAMES, "accuracy-drop limit"])
    assert all(t.mode == "markers" for t in fig.data if t.mode != "lines")  # no trace text that could overlap
