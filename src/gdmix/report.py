"""The run report: one self-contained HTML page a person opens to see how a run went.

Config summary; the configured metrics per iteration × coordinate (with ``select``,
which step's models were exported); per step, the time of each stage, the solver's
iterations and outcome and the entity counts (active, passive, unseen in validation);
train against validation log loss over the steps and, for the last step, every
configured metric on both; validation AUC and the model objective over the steps; for
the last step the ROC curve, a calibration plot and the score histogram by label; the
fixed effect's largest coefficients and the spread of each random effect's per-entity
coefficients (``gdmix.model_summary``). Everything comes from the step records
(``metrics.json``) and the exported models. Plots are matplotlib PNGs embedded as base64,
so the file can be sent or shown as a KFP artifact; a tiny inline script marks the page
``data-images="decoded"`` once every image has decoded (the browser test reads it).
"""
from __future__ import annotations

import base64
import html
import io as _bytes_io

from gdmix import layout, model_summary, storage
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
        out = f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.6g}"
        return out[1:] if out.startswith("-") and float(out) == 0 else out  # no "-0.0000"
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
    ax.set_title("model objective (training rows)")
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


def _calibration_plot(cal: dict) -> str:
    """Observed rate against mean predicted probability per bin (the diagonal: calibrated),
    beside the histogram of predicted probabilities by label (rows)."""
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pts = [(p, o, w) for p, o, w in zip(cal["mean_predicted"], cal["observed_rate"], cal["weight"]) if p is not None]
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=0.8, label="calibrated")
    ax.plot([p for p, _, _ in pts], [o for _, o, _ in pts], marker="o", label="model")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed positive rate")
    ax.set_title("calibration (validation)")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    edges = cal["edges"]
    left, width = edges[:-1], [b - a for a, b in zip(edges, edges[1:])]
    ax2.bar(left, cal["negatives"], width=width, align="edge", alpha=0.6, label="label 0", color="C0")
    ax2.bar(left, cal["positives"], width=width, align="edge", alpha=0.6, label="label 1", color="C1")
    ax2.set_xlabel("predicted probability")
    ax2.set_ylabel("validation rows")
    ax2.set_title("score histogram by label")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _png(fig)


def _train_validation_plot(labels: list[str], train: list, validation: list) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for values, name in ((train, "train"), (validation, "validation")):
        pts = [(i, v) for i, v in enumerate(values) if v is not None]
        ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title("log loss: train vs validation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _histogram(values, title: str, xlabel: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="C2")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("entities")
    ax.grid(alpha=0.3)
    return _png(fig)


def _label(cfg: Config, key: str) -> str:
    """A record key's column header: a metric's name, or ``<metric> entities``."""
    if key in cfg.metrics:
        return _LABELS.get(key, key)
    return f"{key.removesuffix('.entities')} entities"


def _l2_text(cfg: Config, workdir: str, c) -> str:
    """The l2 column: the number, or auto's mode and the λ its last step used."""
    if c.l2_auto is None:
        return f"{c.l2:g}"
    from gdmix import l2

    return html.escape(f"auto ({c.l2_auto}): {l2.l2_of(cfg, workdir, None, c.name).summary()}")


def _l2_passes(cfg: Config, workdir: str) -> str:
    """Per ``l2: auto`` coordinate, the λ each of its steps used (gdmix.l2)."""
    from gdmix import l2, plan

    rows = []
    for s in plan.steps(cfg):
        doc = l2.read(workdir, s) if cfg.coordinate(s.coordinate).l2_auto else None
        if doc is not None:
            rows.append([str(s.iteration), html.escape(s.coordinate), str(len(doc["rounds"])),
                         html.escape(l2.L2.from_json(doc["used"]).summary()),
                         html.escape(l2.L2.from_json(doc["next"]).summary())])
    if not rows:
        return ""
    return ("<h2>Estimated l2 (auto)</h2><p class='muted'>λ = 1/σ² of each coordinate's coefficients, by the "
            "Laplace marginal likelihood (docs/design.md §7): used by the step, and handed on to its next step "
            "(l2.json in the step folder).</p>"
            + _table(["iteration", "coordinate", "rounds", "λ used", "λ next"], rows, left=2))


def _config_section(cfg: Config, workdir: str | None = None) -> str:
    d = cfg.data
    rows = [[html.escape(c.name), html.escape(c.type), html.escape(c.feature_bag),
             html.escape(c.entity or "—"), _l2_text(cfg, workdir or cfg.workdir, c),
             "yes" if c.regularize_intercept else "no"]
            for c in cfg.coordinates]
    return (f"<p>Iterations: {cfg.iterations} &nbsp; Training data: <code>{html.escape(d.train)}</code>"
            f" &nbsp; Validation: <code>{html.escape(d.validation or f'{d.validation_fraction:.0%} held out of training data')}</code></p>"
            + _table(["coordinate", "type", "feature bag", "entity", "l2", "penalised intercept"], rows, left=4))


# Marks the page once every image has decoded (a browser test reads the attribute).
_IMAGES_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images", (ok ? "decoded " : "broken ") + imgs.length);
});
</script>"""


def _secs(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _steps_section(workdir: str, recs: list[dict]) -> list[str]:
    """Per step: each stage's time, the step's own objective, the solver's work and outcome,
    the entity counts of a per-entity coordinate."""
    prep = storage.done_info(layout.prepared_root(workdir), "prepare") or {}
    rows, total = [], 0.0
    for r in recs:
        sec, tr = r.get("seconds") or {}, r.get("training") or {}
        total += sum(v for v in sec.values() if v)
        its = tr.get("iterations")
        if its is None and tr.get("entity_iterations"):
            its = f"≤ {tr['entity_iterations']['max']} per entity"
        rows.append([str(r["iteration"]), html.escape(r["coordinate"]), _secs(sec.get("partition")),
                     _secs(sec.get("train")), _secs(sec.get("metrics")), _num(tr.get("coordinate_objective"), 6),
                     _num(its), html.escape(tr.get("outcome") or "n/a"),
                     _num(tr.get("active_entities")), _num(tr.get("passive_entities")),
                     _num(tr.get("unseen_entities"))])
    head = f"<p>Prepare: {_secs(prep.get('seconds'))} s"
    if prep.get("rows"):
        head += " &nbsp; rows: " + ", ".join(f"{html.escape(k)} {v}" for k, v in prep["rows"].items())
    head += f" &nbsp; all steps' stages: {total:.1f} s (metrics run beside the next steps)</p>"
    return ["<h2>Time and training per step</h2>", head,
            "<p class='muted'>Seconds per stage; the <i>coordinate objective</i> is the step's own "
            "sub-problem (its rows' loss with the other coordinates' scores as offsets, plus the "
            "penalties it changes), not the model objective above. Entities: <i>active</i> have a "
            "model, <i>passive</i> had too few training rows (min_samples), <i>unseen</i>: validation "
            "entities without a model.</p>",
            _table(["iteration", "coordinate", "partition s", "train s", "metrics s", "coordinate objective",
                    "iterations", "solver outcome", "active", "passive", "unseen"], rows, left=2)
]


def _train_validation_section(cfg: Config, recs: list[dict], labels: list[str]) -> list[str]:
    """Train against validation: log loss over the steps, every metric for the last step."""
    out = ["<h2>Train vs validation</h2>"]
    if any(r.get("train_logloss") is not None for r in recs):
        out.append(_train_validation_plot(labels, [r.get("train_logloss") for r in recs],
                                          [r.get("logloss") for r in recs]))
    last = recs[-1]
    tm = last.get("train_metrics")
    if tm:
        rows = [[html.escape(_LABELS.get(k, k)), _num(tm.get(k)), _num(last.get(k))]
                for k in cfg.metrics if k in tm]
        out.append(f"<p>After iter-{last['iteration']}/{html.escape(last['coordinate'])}:</p>")
        out.append(_table(["metric", "train", "validation"], rows, left=1))
    return out


def _models_section(cfg: Config, workdir: str) -> list[str]:
    """The fixed effect's largest coefficients; each random effect's per-entity spread."""
    out = []
    for c in cfg.coordinates:
        if not model_summary.has_ntv_model(cfg, workdir, c):
            continue
        if c.is_fixed_effect:
            top = model_summary.largest_coefficients(workdir, c)
            out.append(f"<h3>{html.escape(c.name)}: the {len(top['largest'])} largest of {top['features']} "
                       f"coefficients (intercept {_num(top['intercept'])})</h3>")
            out.append(_table(["feature", "coefficient"],
                              [[html.escape(n), _num(v)] for n, v in top["largest"]], left=1))
        else:
            sp = model_summary.entity_spread(workdir, c)
            out.append(f"<h3>{html.escape(c.name)}: per-entity coefficients over {sp['entities']} entities</h3>")
            out.append(_table(["coefficient", "entities", "mean", "std", "5 %", "median", "95 %"],
                              [[html.escape(r["coefficient"]), str(r["entities"]), _num(r["mean"]), _num(r["std"]),
                                _num(r["q05"]), _num(r["q50"]), _num(r["q95"])] for r in sp["rows"]], left=1))
            if len(sp["intercepts"]):
                out.append(_histogram(sp["intercepts"], f"{c.name}: entity intercepts", "intercept"))
    return (["<h2>Models</h2>", "<p class='muted'>The exported models (<code>models/</code>).</p>"] + out) if out else []


def render(cfg: Config, workdir: str, recs: list[dict]) -> str:
    """The report's HTML for these step records."""
    import matplotlib

    matplotlib.use("Agg")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}: gdmix run report"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(cfg.name)}</h1><p class='muted'>gdmix run report &middot; work directory "
             f"<code>{html.escape(workdir)}</code></p>",
             "<h2>Configuration</h2>", _config_section(cfg, workdir), _l2_passes(cfg, workdir),
             "<h2>Metrics per step</h2>"]
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
        parts.append(_table(["iteration", "coordinate", *header, "model objective", "train loss", "penalty",
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
        parts += _steps_section(workdir, recs)
        parts += _train_validation_section(cfg, recs, labels)
        parts.append("<h2>Over the steps</h2>")
        if any(r.get("auc") is not None for r in recs):
            parts.append(_line_plot(labels, [r.get("auc") for r in recs], "validation AUC", "AUC"))
        parts.append(_objective_plot(labels, [r.get("objective") for r in recs]))
        last = recs[-1]
        url = roc_path(workdir, last["iteration"], last["coordinate"])
        if storage.exists(url):
            parts.append(f"<h2>ROC curve after iter-{last['iteration']}/{html.escape(last['coordinate'])}</h2>")
            parts.append(_roc_plot(storage.read_json(url), f"validation AUC {_num(last.get('auc'))}"))
        if last.get("calibration"):
            parts.append(f"<h2>Calibration and scores after iter-{last['iteration']}/"
                         f"{html.escape(last['coordinate'])}</h2>")
            parts.append("<p class='muted'>Validation rows in 20 bins of predicted probability: the observed "
                         "positive rate against the bin's mean prediction (on the diagonal: calibrated), and "
                         "how many rows of each label fall in each bin.</p>")
            parts.append(_calibration_plot(last["calibration"]))
    parts += _models_section(cfg, workdir)
    parts.append(_IMAGES_CHECK)
    parts.append("</body></html>")
    return "\n".join(parts)


def write(cfg: Config, workdir: str | None = None) -> str:
    """Write ``report.html`` into the work directory; return its URL."""
    workdir = workdir or cfg.workdir
    url = layout.report(workdir)
    storage.write_text(url, render(cfg, workdir, step_records(cfg, workdir)))
    return url


def grid_section(doc: dict) -> str:
    """An ``l2`` grid search's points (``gdmix.grid``'s grid.json): a table per searched
    coordinate and a plot of the metric against λ (log scale), the chosen λ marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = doc["metric"]
    parts = [f"<h2>l2 grid search</h2><p class='muted'>One coordinate at a time in config order, the "
             f"others held at their best; each point a whole run warm-started from the previous one. "
             f"Chosen: {html.escape(', '.join(f'{k} = {v:g}' for k, v in doc['chosen'].items()))}; these "
             f"models and metrics are the run of <code>{html.escape(doc['chosen_workdir'])}</code>.</p>"]
    coords = list(dict.fromkeys(p["coordinate"] for p in doc["points"]))
    rows = [[html.escape(p["coordinate"]), f"{p['l2']:g}", _num(p.get(metric), 6),
             "&#9664; chosen" if p.get("chosen") else "",
             html.escape(", ".join(f"{k} = {v:g}" for k, v in p["held"].items()))] for p in doc["points"]]
    parts.append(_table(["coordinate", "l2", _LABELS.get(metric, metric), "", "others held at"], rows, left=1))
    fig, axes = plt.subplots(1, len(coords), figsize=(4.5 * len(coords), 3.2), squeeze=False)
    for ax, c in zip(axes[0], coords):
        pts = sorted((p["l2"], p.get(metric), p.get("chosen")) for p in doc["points"] if p["coordinate"] == c)
        ax.semilogx([x for x, v, _ in pts if v is not None], [v for _, v, _ in pts if v is not None], marker="o")
        for x, v, ch in pts:
            if ch and v is not None:
                ax.semilogx([x], [v], marker="*", markersize=14, color="C3")
        ax.set_title(f"{c}: validation {_LABELS.get(metric, metric)} vs l2")
        ax.set_xlabel("l2")
        ax.grid(alpha=0.3)
    parts.append(_png(fig))
    return "\n".join(parts)
