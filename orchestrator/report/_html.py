"""`report.html`: the jinja2 template filled with run facts, the front table and inlined plotly figures."""

from __future__ import annotations

from importlib import resources

import jinja2
import plotly.graph_objects as go
from markupsafe import Markup

from orchestrator.report._data import RunData
from orchestrator.report._figures import FONT, front_figure, heatmaps
from orchestrator.report._format import objectives, run_facts
from orchestrator.report._points import AXES, has_point
from orchestrator.report._sensitivity import sensitivity_figure
from orchestrator.report._table import front_table

TEMPLATE = "template.html.j2"
_PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}


class _Inliner:
    """Turns figures into HTML divs in document order; only the first carries plotly.js (inlined, offline)."""

    def __init__(self) -> None:
        self._first = True

    def __call__(self, fig: go.Figure, div_id: str) -> Markup:
        html = fig.to_html(
            full_html=False,
            include_plotlyjs=self._first,
            config=_PLOT_CONFIG,
            div_id=div_id,
            default_height=f"{fig.layout.height}px",
        )
        self._first = False
        return Markup(html)


def render_html(run: RunData) -> str:
    """The whole page as one self-contained HTML string."""
    inline = _Inliner()
    axes = [x for x in AXES if x in ("size_bytes", "latency_ms") or x in (run.run_info.get("objectives") or [])]
    plots = [inline(front_figure(run, x), f"front-{x}") for x in axes if any(has_point(r, x) for r in run.trials)]
    maps = [
        (title, inline(fig, "heat-" + title.replace(" ", "-")) if fig is not None else None)
        for title, fig in heatmaps(run)
    ]
    sensitivity = sensitivity_figure(run.sensitivity, run.sensitivity_info, FONT)
    source = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(source)
    return template.render(
        run=run,
        workload=run.run_info.get("workload") or "n/a",
        objectives=objectives(run.run_info),
        failed=sum(1 for t in run.trials if t.get("status") == "failed"),
        facts=run_facts(run.run_info, run.trials),
        table=front_table(run.front, run.run_info, run.notes, run.trials),
        plots=plots,
        heatmaps=maps,
        sensitivity=inline(sensitivity, "sensitivity") if sensitivity is not None else None,
        sensitivity_info=run.sensitivity_info,
        workload_metric=run.sensitivity_info.get("metric") or run.metric,
    )
