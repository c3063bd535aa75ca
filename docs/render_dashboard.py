"""The Grafana dashboard of `uffdtrace export` (uffdtrace/dashboard.py), drawn without Grafana:
every panel's queries are run as range queries against a Prometheus and drawn with matplotlib,
each panel at its place in the dashboard's grid, into a PNG.

Run from the repository with:
    python -m docs.render_dashboard --url http://127.0.0.1:9090 --start now-10m -o docs/dashboard.png

Heatmaps show the bucket rates (de-accumulated, as Grafana does) over time, timeseries panels
their lines, stat panels the last value over a sparkline. `$__rate_interval` is computed as
Grafana does, from the step and Prometheus' scrape interval, unless --rate-interval is given.
A query that Prometheus refuses is an error: every expression of the dashboard is checked.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from uffdtrace.dashboard import RATE, Panel, layout

Series = tuple[dict[str, str], np.ndarray, np.ndarray]  # labels, unix times, values

INCH_PER_COLUMN = 0.8  # Grafana's grid: 24 columns of ~80 px, rows of 30 px
INCH_PER_ROW = 0.32


# --- Prometheus ------------------------------------------------------------------------------

def _api(url: str, path: str, params: dict[str, str] | None = None) -> dict:
    body = urllib.parse.urlencode(params).encode() if params else None
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/v1/{path}", data=body),
                                    timeout=30) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        answer = json.load(e)
    if answer.get("status") != "success":
        raise RuntimeError(f"{url}/api/v1/{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
    return answer["data"]


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[Series]:
    data = _api(url, "query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                     "step": f"{step:g}"})
    out = []
    for s in data["result"]:
        values = np.array(s["values"], dtype=float).reshape(-1, 2)
        out.append((s["metric"], values[:, 0], values[:, 1]))
    return out


def parse_duration(text: str) -> float:
    """A Prometheus duration ("800ms", "15s", "1m30s") in seconds."""
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|[smhdwy])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def scrape_interval(url: str) -> float:
    """The global scrape interval of the Prometheus at `url` (its default, 1 m, if unset)."""
    config = _api(url, "status/config")["yaml"]
    m = re.search(r"^global:\n(?:[ ].*\n)*?[ ]+scrape_interval: (\S+)", config, re.M)
    return parse_duration(m.group(1)) if m else 60.0


def rate_interval(step: float, scrape_s: float) -> str:
    """Grafana's $__rate_interval: max(step + scrape interval, 4 * scrape interval)."""
    return f"{math.ceil(max(step + scrape_s, 4 * scrape_s) * 1000):d}ms"


# --- units -----------------------------------------------------------------------------------

def fmt(value: float, unit: str) -> str:
    """`value` as Grafana shows `unit`, shortly."""
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    if unit == "s":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if a >= scale or scale == 1e-9:
                return f"{value / scale:.3g} {suffix}" if value else "0"
    if unit == "percentunit":
        return f"{value * 100:.3g} %"
    if unit == "bytes":
        for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if a >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.0f} B"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            text = f"{value / scale:.3g}{suffix}"
            break
    else:
        text = f"{value:.3g}"
    return f"{text}/s" if unit == "ops" else text


def legend(fmt_: str, labels: dict[str, str]) -> str:
    """A Grafana legend format ("{{comm}} p99") filled in with a series' labels."""
    if not fmt_:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt_)


def _dates(t: np.ndarray) -> np.ndarray:
    return mdates.date2num([datetime.fromtimestamp(x) for x in t])


# --- panels ----------------------------------------------------------------------------------

def _no_data(ax: plt.Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", color="0.6", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_heatmap(ax: plt.Axes, panel: Panel, series: list[Series], start: float, end: float,
                 step: float) -> bool:
    """Faults/s per bucket over time, from the cumulative `le` bucket rates."""
    buckets = sorted(((float(labels["le"]), t, v) for labels, t, v in series if "le" in labels),
                     key=lambda b: b[0])
    if not buckets:
        _no_data(ax)
        return False
    times = np.arange(start, end + step / 2, step)
    cumulative = np.zeros((len(buckets), len(times)))
    for i, (_, t, v) in enumerate(buckets):
        idx = np.clip(np.rint((t - start) / step).astype(int), 0, len(times) - 1)
        cumulative[i, idx] = np.nan_to_num(v)
    rates = np.diff(cumulative, axis=0, prepend=0).clip(min=0)
    rows = np.flatnonzero(rates.sum(axis=1) > 0)
    if not len(rows):
        _no_data(ax)
        return False
    lo, hi = max(rows[0] - 1, 0), min(rows[-1] + 2, len(buckets))
    rates, bounds = rates[lo:hi], [b[0] for b in buckets[lo:hi]]
    t0, t1 = _dates(np.array([start - step / 2, end + step / 2]))
    im = ax.imshow(rates, aspect="auto", origin="lower", interpolation="nearest", cmap="Oranges",
                   extent=(t0, t1, 0, len(bounds)), norm=PowerNorm(0.5, vmin=0))
    every = max(1, math.ceil(len(bounds) / 10))
    ax.set_yticks([i + 0.5 for i in range(0, len(bounds), every)],
                  ["+Inf" if math.isinf(b) else f"≤ {fmt(b, panel.unit)}" for b in bounds[::every]])
    _time_axis(ax, start - step / 2, end + step / 2)
    ax.figure.colorbar(im, ax=ax, pad=0.01, fraction=0.03, format=FuncFormatter(
        lambda v, _: fmt(v, "ops")))
    return True


def _time_axis(ax: plt.Axes, start: float, end: float) -> None:
    """The dashboard's time range on x, as every Grafana panel shows it."""
    ax.set_xlim(*_dates(np.array([start, end])))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=6))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))


def draw_timeseries(ax: plt.Axes, panel: Panel, per_query: list[list[Series]], start: float,
                    end: float) -> bool:
    drawn = 0
    for query, series in zip(panel.queries, per_query, strict=True):
        for labels, t, v in series:
            if np.isfinite(v).any():
                ax.plot(_dates(t), v, lw=1.2, label=legend(query.legend, labels))
                drawn += 1
    if not drawn:
        _no_data(ax)
        return False
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v, panel.unit)))
    _time_axis(ax, start, end)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[:10], labels[:10], fontsize=7, loc="upper left", framealpha=0.6,
              ncols=2 if drawn > 4 else 1)
    return True


def draw_stat(ax: plt.Axes, panel: Panel, per_query: list[list[Series]], start: float,
              end: float) -> bool:
    found = [(t, v) for series in per_query for _, t, v in series if np.isfinite(v).any()]
    ax.set_xticks([])
    ax.set_yticks([])
    if not found:
        _no_data(ax)
        return False
    t, v = found[0]
    ok = np.isfinite(v)
    last = float(v[ok][-1])
    red = panel.red_from is not None and last >= panel.red_from
    ax.fill_between(_dates(t[ok]), v[ok], color="tab:red" if red else "tab:green", alpha=0.15, lw=0)
    ax.set_xlim(*_dates(np.array([start, end])))
    ax.set_ylim(bottom=min(0, float(v[ok].min())))
    ax.text(0.5, 0.5, fmt(last, panel.unit), ha="center", va="center", fontsize=22,
            color="tab:red" if red else "tab:green", transform=ax.transAxes, weight="bold")
    return True


# --- the whole dashboard ---------------------------------------------------------------------

def render(url: str, start: float, end: float, out: Path, step: float | None = None,
           rate: str | None = None) -> dict[str, bool]:
    """Draws the dashboard over [start, end] into `out` (PNG). Returns, per panel title,
    whether it had data."""
    url = url.rstrip("/")
    step = step or max(1.0, (end - start) / 300)
    rate = rate or rate_interval(step, scrape_interval(url))
    placed = layout()
    rows = max(g["y"] + g["h"] for _, g in placed)
    width, height = 24 * INCH_PER_COLUMN, rows * INCH_PER_ROW + 0.6
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(f"uffdtrace — {datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to "
                 f"{datetime.fromtimestamp(end):%H:%M:%S} (rate interval {rate})", fontsize=13,
                 y=1 - 0.15 / height)
    top = 1 - 0.6 / height  # below the title

    def box(g: dict) -> tuple[float, float, float, float]:
        """left, bottom, width, height in figure fractions."""
        return (g["x"] / 24, top - (g["y"] + g["h"]) * INCH_PER_ROW / height, g["w"] / 24,
                g["h"] * INCH_PER_ROW / height)

    had_data: dict[str, bool] = {}
    for item, g in placed:
        left, bottom, w, h = box(g)
        if isinstance(item, str):
            fig.text(left + 0.004, bottom + h / 2, item, fontsize=12, weight="bold", va="center")
            continue
        fig.add_artist(Rectangle((left + 0.002, bottom + 0.002 * width / height), w - 0.004,
                                 h - 0.004 * width / height, transform=fig.transFigure,
                                 facecolor="0.97", edgecolor="0.8", lw=0.8, zorder=-1))
        pad_l, pad_r, pad_t, pad_b = 0.75 / width, 0.2 / width, 0.35 / height, 0.4 / height
        if item.type == "stat":
            pad_l, pad_b = 0.15 / width, 0.15 / height
        ax = fig.add_axes((left + pad_l, bottom + pad_b, w - pad_l - pad_r, h - pad_t - pad_b))
        ax.set_title(item.title, fontsize=10, loc="left")
        ax.tick_params(labelsize=7)
        per_query = [query_range(url, q.expr.replace(RATE, rate), start, end, step)
                     for q in item.queries]
        if item.type == "heatmap":
            had_data[item.title] = draw_heatmap(ax, item, per_query[0], start, end, step)
        elif item.type == "stat":
            had_data[item.title] = draw_stat(ax, item, per_query, start, end)
        else:
            had_data[item.title] = draw_timeseries(ax, item, per_query, start, end)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return had_data


def parse_time(text: str, now: float) -> float:
    """Unix seconds, "now" or "now-DURATION" (now-10m)."""
    if text == "now":
        return now
    if text.startswith("now-"):
        return now - parse_duration(text[4:])
    return float(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m docs.render_dashboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="Prometheus, e.g. http://127.0.0.1:9090")
    ap.add_argument("--start", default="now-15m", help="unix seconds, now or now-DURATION (default now-15m)")
    ap.add_argument("--end", default="now", help="unix seconds, now or now-DURATION (default now)")
    ap.add_argument("--step", type=float, help="seconds between points (default: range / 300, at least 1)")
    ap.add_argument("--rate-interval", help="what $__rate_interval becomes (default: as Grafana computes it)")
    ap.add_argument("-o", "--out", type=Path, default=Path("dashboard.png"))
    args = ap.parse_args(argv)
    now = time.time()
    had_data = render(args.url, parse_time(args.start, now), parse_time(args.end, now), args.out,
                      args.step, args.rate_interval)
    empty = [t for t, ok in had_data.items() if not ok]
    print(f"{args.out}: {len(had_data) - len(empty)} of {len(had_data)} panels with data"
          + (f"; empty: {', '.join(empty)}" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
