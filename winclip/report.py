"""The batch-inspection report: one self-contained HTML file (thumbnails embedded, plots as inline SVG).

Images ranked most anomalous first with their heat-map overlays and scores, a score histogram with the
threshold, and, for a labelled set, ROC and PR curves with the F1-optimal threshold beside the chosen one.
Pure string building: no template engine, no network resources.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

W, H, PAD = 440, 220, 34  # plot size and margin (px)
# Text and axes take the colour of the text around the SVG (currentColor) and the labels' outline the page's
# background, so that a plot reads on a dark page (the app under a dark theme) as on the report's white one.
# --body-background-fill is Gradio's theme variable; elsewhere (report.html) the fallback white applies.
HALO = 'style="stroke:var(--body-background-fill, #fff)"'


@dataclass(frozen=True)
class Axis:
    """The x axis's range and tick step; the whole 0-1 by default."""

    lo: float = 0.0
    hi: float = 1.0
    step: float = 0.2

    def x(self, v: float) -> float:
        return PAD + (float(v) - self.lo) / (self.hi - self.lo) * (W - 2 * PAD)

    def ticks(self) -> str:
        decimals = max(1, -math.floor(math.log10(self.step) + 1e-9))
        return "".join(f'<text x="{self.x(t):.1f}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">'
                       f'{t:.{decimals}f}</text>'
                       for t in np.linspace(self.lo, self.hi, round((self.hi - self.lo) / self.step) + 1))


FULL = Axis()
ZOOM_BELOW = 0.5  # a histogram whose scores and lines span less than this is drawn over their range only
TICK_STEPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def score_axis(values: Sequence[float]) -> Axis:
    """The whole 0-1 when the values spread over half of it or more (or there are none); otherwise their
    range, padded by 5% and widened to whole tick steps (at most 5 steps, at least 0.01 wide): scores a
    few hundredths apart, as zero-shot scores often are, would otherwise all fall in one bar."""
    if not len(values):
        return FULL
    lo, hi = float(min(values)), float(max(values))
    if hi - lo >= ZOOM_BELOW:
        return FULL
    span = max(hi - lo, 0.01)
    step = next(s for s in TICK_STEPS if span / s <= 5)
    lo = max(0.0, math.floor((lo - 0.05 * span) / step + 1e-9) * step)
    hi = min(1.0, math.ceil((hi + 0.05 * span) / step - 1e-9) * step)
    return Axis(round(lo, 6), round(hi, 6), step)


def _svg_frame(title: str, x_label: str, y_label: str, body: str, axis: Axis = FULL) -> str:
    ticks = axis.ticks()
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
            f'aria-label="{title}" fill="currentColor">'
            f'<text x="{W / 2}" y="14" font-size="12" text-anchor="middle" font-weight="bold">{title}</text>'
            f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="currentColor"/>'
            f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="currentColor"/>{ticks}'
            f'<text x="{W / 2}" y="{H - 4}" font-size="11" text-anchor="middle">{x_label}</text>'
            f'<text x="10" y="{H / 2}" font-size="11" transform="rotate(-90 10 {H / 2})" text-anchor="middle">'
            f'{y_label}</text>{body}</svg>')


def _y(v: float) -> float:
    return H - PAD - float(v) * (H - 2 * PAD)


def histogram_svg(scores: Sequence[float], labels: Sequence[int | None], thresholds: dict[str, float],
                  bins: int = 40) -> str:
    """Stacked counts per score bin (good / defective / unlabelled) with vertical threshold lines, over 0-1
    or, when the scores and lines lie close together, over their range (``score_axis``; the axis label says so)."""
    scores = np.clip(np.asarray(scores, dtype=float), 0, 1)
    axis = score_axis([*scores, *np.clip(list(thresholds.values()), 0, 1)])
    edges = np.linspace(axis.lo, axis.hi, bins + 1)
    groups = {"good": "#3b82f6", "defective": "#ef4444", "unlabelled": "#6b7280"}
    counts = {}
    for name in groups:
        chosen = [s for s, lab in zip(scores, labels)
                  if (lab == 0 and name == "good") or (lab == 1 and name == "defective")
                  or (lab is None and name == "unlabelled")]
        counts[name] = np.histogram(chosen, edges)[0]
    peak = max(1, int(sum(counts.values()).max()))
    body, base = [], np.zeros(bins)
    bar_w = (W - 2 * PAD) / bins
    for name, colour in groups.items():
        for i, c in enumerate(counts[name]):
            if c:
                y0, y1 = _y(base[i] / peak), _y((base[i] + c) / peak)
                body.append(f'<rect x="{axis.x(edges[i]):.1f}" y="{y1:.1f}" width="{bar_w - 1:.1f}" '
                            f'height="{y0 - y1:.1f}" fill="{colour}">'
                            f'<title>{name}: {c} in [{edges[i]:.3f}, {edges[i + 1]:.3f})</title></rect>')
        base += counts[name]
    dash = {"threshold": "", "F1-optimal": ' stroke-dasharray="4 3"'}
    for k, (name, value) in enumerate(thresholds.items()):
        # each label on its own row, on the side of its line with room (left of it past the middle), over a
        # outline of the page's background (HALO) so that bars and the other line do not hide it
        at = axis.x(min(max(value, 0.0), 1.0))
        side = f'x="{at - 3:.1f}" text-anchor="end"' if at > W / 2 else f'x="{at + 3:.1f}"'
        body.append(f'<line x1="{at:.1f}" y1="{PAD}" x2="{at:.1f}" y2="{H - PAD}" stroke="currentColor" '
                    f'stroke-width="1.5"{dash.get(name, "")}/><text {side} y="{PAD + 10 + 13 * k}" font-size="10" '
                    f'paint-order="stroke" {HALO} stroke-width="3">{html.escape(name)} {value:.3f}</text>')
    present = [(n, c) for n, c in groups.items() if counts[n].any()]  # one row above the plot, right-aligned
    legend = "".join(f'<rect x="{W - PAD - 78 * (len(present) - i)}" y="{PAD - 13}" width="8" height="8" fill="{c}"/>'
                     f'<text x="{W - PAD - 78 * (len(present) - i) + 11}" y="{PAD - 5}" font-size="10">{n}</text>'
                     for i, (n, c) in enumerate(present))
    x_label = "anomaly score" if axis == FULL else f"anomaly score (axis zoomed to {axis.lo:g}-{axis.hi:g})"
    return _svg_frame(f"Scores (max bin {peak})", x_label, "images", "".join(body) + legend, axis)


def curve_svg(title: str, xs: Sequence[float], ys: Sequence[float], x_label: str, y_label: str, note: str) -> str:
    points = " ".join(f"{FULL.x(x):.1f},{_y(y):.1f}" for x, y in zip(xs, ys))
    body = (f'<polyline points="{points}" fill="none" stroke="#ef4444" stroke-width="2"/>'
            f'<text x="{W - PAD}" y="{H - PAD - 8}" font-size="11" text-anchor="end">{html.escape(note)}</text>')
    return _svg_frame(title, x_label, y_label, body)


def render(rows: Sequence, summary) -> str:
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: -r.score)
    errors = [r for r in rows if r.status != "ok"]
    threshold = summary.threshold["value"]
    lines = {"threshold": threshold}
    metrics = summary.metrics
    if "f1_optimal_threshold" in metrics:
        lines["F1-optimal"] = metrics["f1_optimal_threshold"]
    plots = [histogram_svg([r.score for r in ok], [r.label for r in ok], lines)]
    if summary.curves:
        image = metrics["image"]
        plots.append(curve_svg("ROC", *summary.curves["roc"], "false positive rate", "true positive rate",
                               f"AUROC {image['auroc']:.4f}"))
        plots.append(curve_svg("Precision-recall", *summary.curves["pr"], "recall", "precision",
                               f"AP {image['aupr']:.4f}"))
    facts = [f"{summary.counts['scored']} scored, {summary.counts['errors']} unreadable, "
             f"{summary.counts['anomalous']} at or above the threshold",
             f"threshold {threshold:.4f} — {html.escape(summary.threshold['how'])}",
             f"{summary.timing['seconds']:.1f} s, {summary.timing['images_per_s'] or 0:.2f} images/s"]
    if "image" in metrics:
        m = metrics["image"]
        facts.append(f"image AUROC {m['auroc']:.4f} · AP {m['aupr']:.4f} · F1-max {m['f1_max']:.4f} · "
                     f"F1-optimal threshold {metrics['f1_optimal_threshold']:.4f}")
    if "pixel" in metrics:
        m = metrics["pixel"]
        facts.append(f"pixel AUROC {m['pauroc']:.4f} · PRO {m['pro']:.4f} · F1-max {m['f1_max']:.4f}")
    for key in ("skipped", "pixel_skipped"):
        if key in metrics:
            facts.append(html.escape(metrics[key]))
    settings = " · ".join(setting_text(k, v) for k, v in summary.settings.items())
    cards = []
    for rank, r in enumerate(ok, 1):
        img = (f'<img src="data:image/jpeg;base64,{base64.b64encode(r.thumbnail).decode()}" alt="">'
               if r.thumbnail else "")
        defect = f" ({html.escape(r.defect)})" if r.label else ""
        label = "" if r.label is None else f" · {'defective' if r.label else 'good'}{defect}"
        cards.append(f'<figure class="{r.verdict}">{img}<figcaption>#{rank} <b>{r.score:.4f}</b> {r.verdict}{label}'
                     f'<br><span>{html.escape(r.file)}</span></figcaption></figure>')
    error_rows = "".join(f"<tr><td>{html.escape(r.file)}</td><td>{html.escape(r.error.removeprefix(r.file + ': '))}"
                         "</td></tr>" for r in errors)  # the file once: its error begins with its name
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary.notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>WinCLIP batch inspection</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#111}} .plots{{display:flex;flex-wrap:wrap;gap:16px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax({200}px,1fr));gap:10px}}
figure{{margin:0;border:2px solid #ccc;border-radius:6px;padding:4px;font-size:12px}}
figure.anomalous{{border-color:#ef4444}} figcaption span{{color:#555;word-break:break-all}} img{{max-width:100%}}
table{{border-collapse:collapse}} td{{border:1px solid #ddd;padding:3px 6px;font-size:12px}}
</style></head><body>
<h1>Batch inspection</h1>
<ul>{"".join(f"<li>{f}</li>" for f in facts)}</ul>
<p style="color:#555;font-size:12px">{settings}</p>
<div class="plots">{"".join(plots)}</div>
<h2>Ranked, most anomalous first</h2>
<div class="grid">{"".join(cards)}</div>
{f"<h2>Unreadable files ({len(errors)})</h2><table>{error_rows}</table>" if errors else ""}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
</body></html>
"""


SETTING_LABELS = {"defect_words": "defect words", "shots": "normal shots", "checked": "precision self-checked",
                  "why": "why this device and precision"}


def setting_text(key: str, value) -> str:
    """One summary.json setting as a reader sees it: 'defect words: none', not "defect_words []"."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value) or "none"
    elif value is None or str(value) in ("", "None"):
        text = "none"
    elif isinstance(value, dict):
        text = ", ".join(f"{k} {v}" for k, v in value.items())
    else:
        text = str(value)
    return f"{SETTING_LABELS.get(key, key.replace('_', ' '))}: {html.escape(text)}"


def write_report(path: Path, rows: Sequence, summary) -> Path:
    path.write_text(render(rows, summary), encoding="utf-8")
    return path
