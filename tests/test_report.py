"""The run report a data scientist reads (issue 14): its sections hold the figures the
run recorded, those figures agree with independent computations, and the page renders in
a real browser (headless Chromium) with every image decoded and no console message."""
from __future__ import annotations

import html as htmllib
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow.compute as pc
import pytest

from gdmix import layout, model_summary, plan, schema, storage

pytestmark = pytest.mark.slow


def _report(cfg) -> str:
    return open(layout.report(cfg.workdir), encoding="utf-8").read()


def _final_scores(cfg, split: str):
    """uid -> label and the full model's score (offset + each coordinate's latest score)
    after the last step, summed from the score files with pyarrow (no Spark)."""
    rows = storage.read_table(layout.prepared(cfg.workdir, split), columns=["uid", "label", "offset"])
    uid = rows.column("uid").to_numpy()
    total = rows.column("offset").to_numpy().astype(np.float64).copy()
    order = np.argsort(uid)
    for coord, step in plan.state(cfg, plan.sequence(cfg)[-1], inclusive=True).items():
        sc = storage.read_table(layout.scores(cfg.workdir, step.iteration, step.coordinate, coord, split))
        pos = order[np.searchsorted(uid, sc.column("uid").to_numpy(), sorter=order)]
        np.add.at(total, pos, sc.column("score").to_numpy())
    return rows.column("label").to_numpy(), total


def test_sections_are_there(cli_run):
    cfg, _ = cli_run
    page = _report(cfg)
    last = plan.sequence(cfg)[-1]  # iter-1/_joint: the run takes the joint step (acceleration: newton)
    for heading in ("Time and training per step", "Train vs validation", f"Calibration and scores after {last}",
                    "Models", "global: the ", "per-user: per-entity coefficients over",
                    "per-item: per-entity coefficients over"):
        assert heading in page, heading
    assert page.count("<img") >= 7  # AUC, objective, train vs validation, ROC, calibration, 2 intercept histograms


def test_step_times_and_training_match_the_records(cli_run):
    cfg, _ = cli_run
    recs = storage.read_json(layout.metrics(cfg.workdir))
    page = _report(cfg)
    table = page.split("Time and training per step")[1].split("</table>")[0]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    assert len(cells) == len(recs)
    for r, row in zip(recs, cells):
        done = storage.done_info(layout.step_dir(cfg.workdir, r["iteration"], r["coordinate"]), "train")
        assert row[:2] == [str(r["iteration"]), r["coordinate"]]
        assert row[2:5] == ["n/a" if r["seconds"][k] is None else f"{r['seconds'][k]:.1f}"  # a joint step: no partition
                            for k in ("partition", "train", "metrics")]
        assert float(row[5]) == pytest.approx(done["objective"], rel=1e-6)
        assert htmllib.unescape(row[7]) == done["outcome"]
        if r["coordinate"] == "per-item":
            assert row[8:11] == [str(done[k]) for k in ("active_entities", "passive_entities", "unseen_entities")]


def test_unseen_entities_are_the_validation_entities_without_a_model(cli_run):
    cfg, _ = cli_run
    info = storage.done_info(layout.step_dir(cfg.workdir, 1, "per-item"), "train")
    val = storage.read_table(layout.prepared(cfg.workdir, "validation"), columns=["item_id"])
    seen = set(storage.read_table(layout.model(cfg.workdir, "per-item"), columns=[schema.MODEL_ID])
               .column(schema.MODEL_ID).to_pylist())
    unseen = {str(v) for v in val.column("item_id").to_pylist()} - seen
    assert info["unseen_entities"] == len(unseen) > 0
    assert info["active_entities"] == len(seen)


def test_train_vs_validation_agree_with_the_scores(cli_run):
    cfg, _ = cli_run
    last = storage.read_json(layout.metrics(cfg.workdir))[-1]
    # two computations of the train log loss: Σℓ/Σw from the objective's sum, and by score groups
    assert last["train_metrics"]["logloss"] == pytest.approx(last["train_logloss"], rel=1e-9)
    y, s = _final_scores(cfg, "train")
    ll = np.mean(np.logaddexp(0.0, s) - y * s)
    assert last["train_logloss"] == pytest.approx(ll, rel=1e-9)
    from sklearn.metrics import roc_auc_score

    assert last["train_metrics"]["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    page = _report(cfg)
    assert f"<td>{last['train_metrics']['auc']:.4f}</td><td>{last['auc']:.4f}</td>" in page


def test_calibration_and_histogram_match_the_validation_scores(cli_run):
    cfg, _ = cli_run
    cal = storage.read_json(layout.metrics(cfg.workdir))[-1]["calibration"]
    y, s = _final_scores(cfg, "validation")
    p = 1.0 / (1.0 + np.exp(-s))
    b = np.minimum((p * cal["bins"]).astype(int), cal["bins"] - 1)
    for i in range(cal["bins"]):
        inside = b == i
        assert cal["positives"][i] == int((y[inside] == 1).sum())
        assert cal["negatives"][i] == int((y[inside] == 0).sum())
        if inside.any():
            assert cal["mean_predicted"][i] == pytest.approx(p[inside].mean(), rel=1e-9)
            assert cal["observed_rate"][i] == pytest.approx(y[inside].mean(), rel=1e-12)
        else:
            assert cal["mean_predicted"][i] is None


def test_model_tables_match_the_exported_models(cli_run):
    cfg, _ = cli_run
    page = _report(cfg)
    means = storage.read_table(layout.model(cfg.workdir, "global")).column("means").combine_chunks()
    flat = pc.list_flatten(means)
    names, values = flat.field("name").to_pylist(), flat.field("value").to_pylist()
    biggest = max((abs(v), v) for n, v in zip(names, values) if n != schema.INTERCEPT_NAME)[1]
    section = page.split("<h3>global: the ")[1].split("</table>")[0]
    first = re.findall(r"<td[^>]*>(.*?)</td>", section)[:2]
    assert float(first[1]) == pytest.approx(biggest, abs=5e-5)
    spread = model_summary.entity_spread(cfg.workdir, cfg.coordinate("per-user"))
    intercepts = [m["means"] for m in storage.read_table(layout.model(cfg.workdir, "per-user")).to_pylist()]
    icp = np.array([t["value"] for m in intercepts for t in m if t["name"] == schema.INTERCEPT_NAME])
    assert spread["entities"] == len(intercepts)
    assert spread["rows"][0]["coefficient"] == schema.INTERCEPT_NAME
    assert spread["rows"][0]["q50"] == pytest.approx(np.median(icp), rel=1e-12)
    assert spread["rows"][0]["std"] == pytest.approx(icp.std(), rel=1e-12)


# --- in a real browser ---------------------------------------------------------------------

def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI: chromium is missing (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium not found (apt-get install chromium); CI runs this test")
    return found


def _browser(exe: str, *args: str, timeout: float = 120):
    return subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_report_renders_in_chromium(cli_run, tmp_path):
    exe = _chromium()
    cfg, _ = cli_run
    url = "file://" + storage.absolute(layout.report(cfg.workdir))
    n_images = _report(cfg).count("<img")

    dom = _browser(exe, "--virtual-time-budget=10000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-images="decoded {n_images}"' in dom.stdout, dom.stdout[-500:]
    assert ":CONSOLE" not in dom.stderr, [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]

    shot = tmp_path / "report.png"
    run = _browser(exe, f"--screenshot={shot}", "--window-size=1200,4000", url)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert ":CONSOLE" not in run.stderr
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.shape[:2] == (4000, 1200)
    assert float(pixels[..., :3].std()) > 0.05, "a blank page"
    keep = os.environ.get("GDMIX_REPORT_SCREENSHOT")  # to look at it: a path to copy it to
    if keep:
        shutil.copy(shot, keep)
