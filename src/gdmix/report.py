"""The run report: one self-contained HTML page a person opens to see how a run went.

Config summary, the configured metrics per iteration × coordinate (with ``select``,
which step's models were exported), validation AUC and training objective over the
steps, and the ROC curve of the last evaluated step. Plots are
matplotlib PNGs embedded as base64, so the file can be sent or shown as a KFP artifact.
"""
from __future__ import annotations

import base64
import html
import io as _bytes_io

from gdmix import layout, storage
from gdmix.config import Config
from gdmix.metrics import objective_rises, record_keys, roc_path, select
from gdmix.metrics import records as step_records

_LABELS = {"auc": "AUC", "aupr": "AUPR", "logloss": "log loss", "rmse": "RMSE", "poisson_deviance": "Poisson deviance"}
_LOSS_NAMES = {"logistic": "logistic loss", "linear": "squared error ½(s − y)²", "poisson": "Poisson loss e^s − y s"}

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
img { max-width: 100%; } .muted { color: #777; }
"""


def _num(v, digits=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.6g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    """An HTML table; the first ``left`` columns are text (left-aligned)."""
    cls = lambda i: ' class="l"' if i < left else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return '<img src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode("ascii") + '">'


def _line_plot(labels: list[str], values: list, title: str, ylabel: str) -> str:
    import matplotlib.pyplot as plt

    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _png(fig)


def _objective_plot(labels: list[str], values: list) -> str:
    """The objective, and beside it its relative excess over the lowest value reached (log
    scale): the late steps of coordinate descent change it too little to see otherwise."""
    import matplotlib.pyplot as plt

    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    best = min(v for _, v in pts)
    gap = [(i, (v - best) / max(abs(best), 1e-300)) for i, v in pts if v > best]
    fig, axes = plt.subplots(1, 2 if gap else 1, figsize=(11 if gap else 7, 3.2), squeeze=False)
    ax = axes[0][0]
    ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o")
    ax.set_title("training objective")
    if gap:
        ax2 = axes[0][1]
        ax2.semilogy([i for i, _ in gap], [g for _, g in gap], marker="o", color="C1")
        ax2.set_title("(objective − lowest) / lowest")
    for a in axes[0]:
        a.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        a.set_xlim(-0.5, len(labels) - 0.5)
        a.grid(alpha=0.3)
    return _png(fig)


def _roc_plot(roc: dict, title: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot(roc["fpr"], roc["tpr"])
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    return _png(fig)


def _label(cfg: Config, key: str) -> str:
    """A record key's column header: a metric's name, or ``<metric> entities``."""
    if key in cfg.metrics:
        return _LABELS.get(key, key)
    return f"{key.removesuffix('.entities')} entities"


def _config_section(cfg: Config) -> str:
    d = cfg.data
    rows = [[html.escape(c.name), html.escape(c.type), html.escape(c.feature_bag),
             html.escape(c.entity or "—"), f"{c.l2:g}", "yes" if c.regularize_intercept else "no"]
            for c in cfg.coordinates]
    return (f"<p>Iterations: {cfg.iterations} &nbsp; Training data: <code>{html.escape(d.train)}</code>"
            f" &nbsp; Validation: <code>{html.escape(d.validation or f'{d.validation_fraction:.0%} held out of training data')}</code></p>"
            + _table(["coordinate", "type", "feature bag", "entity", "l2", "penalised intercept"], rows, left=4))


def render(cfg: Config, workdir: str, recs: list[dict]) -> str:
    """The report's HTML for these step records."""
    import matplotlib

    matplotlib.use("Agg")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}: gdmix run report"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(cfg.name)}</h1><p class='muted'>gdmix run report &middot; work directory "
             f"<code>{html.escape(workdir)}</code></p>",
             "<h2>Configuration</h2>", _config_section(cfg), "<h2>Metrics per step</h2>"]
    if not recs:
        parts.append("<p>No step has been evaluated yet.</p>")
    else:
        keys = record_keys(cfg)
        best = select(cfg, recs)
        chosen = None if best is None else (best["iteration"], best["coordinate"])
        mark = (lambda r: "&#9664; exported" if (r["iteration"], r["coordinate"]) == chosen else "")  # noqa: E731
        rows = [[str(r["iteration"]), html.escape(r["coordinate"]), *[_num(r.get(k)) for k in keys],
                 _num(r.get("objective"), 6), _num(r.get("train_loss"), 6), _num(r.get("penalty"), 6),
                 *([mark(r)] if cfg.select else [])] for r in recs]
        parts.append("<p class='muted'>Validation metrics of the full model (offset plus the latest "
                     "score of every trained coordinate) after each step; objective on training rows "
                     f"(summed {_LOSS_NAMES[cfg.task]} plus L2 penalty; it should not increase). A per-entity "
                     "metric's <i>entities</i> column: how many entities its mean is over.</p>")
        header = [_label(cfg, k) for k in keys]
        parts.append(_table(["iteration", "coordinate", *header, "objective", "train loss", "penalty",
                             *(["selected"] if cfg.select else [])], rows, left=2))
        for w in objective_rises(cfg, recs):
            parts.append(f"<p class='warning' style='color:#b00020;font-weight:bold'>WARNING: {html.escape(w)}</p>")
        if cfg.select:
            if best is None:
                parts.append(f"<p>Exported models: those of the last step (no step after which every "
                             f"fixed effect is trained has a validation {html.escape(cfg.select)}).</p>")
            else:
                parts.append(f"<p><b>Exported models: those after iter-{best['iteration']}/"
                             f"{html.escape(best['coordinate'])}</b>, the step with the best validation "
                             f"{html.escape(cfg.select)} ({_num(best[cfg.select], 6)}; <code>select</code>).</p>")
        labels = [f"{r['iteration']}:{r['coordinate']}" for r in recs]
        parts.append("<h2>Over the steps</h2>")
        if any(r.get("auc") is not None for r in recs):
            parts.append(_line_plot(labels, [r.get("auc") for r in recs], "validation AUC", "AUC"))
        parts.append(_objective_plot(labels, [r.get("objective") for r in recs]))
        last = recs[-1]
        url = roc_path(workdir, last["iteration"], last["coordinate"])
        if storage.exists(url):
            parts.append(f"<h2>ROC curve after iter-{last['iteration']}/{html.escape(last['coordinate'])}</h2>")
            parts.append(_roc_plot(storage.read_json(url), f"validation AUC {_num(last.get('auc'))}"))
    parts.append("</body></html>")
    return "\n".join(parts)


def write(cfg: Config, workdir: str | None = None) -> str:
    """Write ``report.html`` into the work directory; return its URL."""
    workdir = workdir or cfg.workdir
    url = layout.report(workdir)
    storage.write_text(url, render(cfg, workdir, step_records(cfg, workdir)))
    return url
