"""What a person sees while ``gdmix run`` works: one ordered log, a progress line that
moves, one name per figure, solver outcomes in plain words, and none of the JVM's or
libraries' noise (issue 14, feedback)."""
from __future__ import annotations

import io
import re
import threading
import time

import pytest

from gdmix import console, layout, plan, storage

LINE = re.compile(r"^\[\s*([\d.]+)s\] (\S+)\s+(\S+)\s+([\d.]+)s\s*(.*)$")
NOISE = ("Using incubator modules", "NativeCodeLoader", "native-hadoop", "FutureWarning",
         "A bad approximation", "ABNORMAL_TERMINATION")


def _progress_lines(out: str) -> list[tuple[float, str, str, str]]:
    return [(float(m[1]), m[2], m[3], m[5]) for m in map(LINE.match, out.splitlines()) if m]


pytestmark = pytest.mark.slow


def test_no_noise_from_the_jvm_or_libraries(cli_run):
    _, proc = cli_run
    for text in NOISE:
        assert text not in proc.stdout and text not in proc.stderr, text


def test_one_ordered_log(cli_run):
    cfg, proc = cli_run
    assert "\r" not in proc.stdout  # not a terminal: plain lines only
    lines = _progress_lines(proc.stdout)
    times = [t for t, *_ in lines]
    assert times == sorted(times), "the clock column goes back: a line was printed out of order"
    steps = [str(s) for s in plan.steps(cfg)]
    # every step's three stages once each, in stage order; metrics in plan order
    for s in steps:
        assert [st for _, what, st, _ in lines if what == s] == ["partition", "train", "metrics"], s
    assert [what for _, what, st, _ in lines if st == "metrics" and what in steps] == steps
    # a step's metrics line comes after its own training
    order = [(what, st) for _, what, st, _ in lines]
    for s in steps:
        assert order.index((s, "metrics")) > order.index((s, "train"))
    # whole lines only: every non-empty line is a progress line, a known stage line, or the summary
    for ln in proc.stdout.splitlines():
        assert not re.search(r"\S\[\s*[\d.]+s\]", ln), f"a line broke into another: {ln!r}"


def test_the_plain_progress_line_moves_in_a_long_stage(cli_run):
    _, proc = cli_run
    moving = [ln for ln in proc.stdout.splitlines() if ln.startswith("  ... ")]
    assert moving, "GDMIX_PROGRESS_SECONDS=1: a stage over a second shows a progress line"
    assert all(re.search(r"\d+\.\d s", ln) and ln.endswith("(still running)") for ln in moving), moving
    assert any("prepare" in ln for ln in moving)


def test_one_name_per_figure_each_printed_once(cli_run):
    cfg, proc = cli_run
    records = storage.read_json(layout.metrics(cfg.workdir))
    body = proc.stdout.split("validation metrics (cumulative")[0]
    lines = _progress_lines(body)
    for r in records:
        step = f"iter-{r['iteration']}/{r['coordinate']}"
        joint = r["coordinate"] == plan.JOINT  # the joint step's line: its stage is "accelerate"
        train = [d for _, what, st, d in lines if what == step and st == ("accelerate" if joint else "train")][0]
        metrics = [d for _, what, st, d in lines if what == step and st == "metrics"][0]
        assert train.startswith("coordinate objective ") and "model objective" not in train
        assert f"model objective {r['objective']:.6f}" in metrics
        assert f"auc {r['auc']:.4f}" in metrics and f"train logloss {r['train_logloss']:.4f}" in metrics
        # each validation figure once before the summary table (no second format of it)
        assert sum(1 for ln in body.splitlines() if re.search(rf"{re.escape(step)}\b", ln)
                   and re.search(r"\bauc\b", ln, re.I)) == 1, step
    for _, _, _, detail in lines:  # no bare "objective" left to guess at
        assert not re.search(r"(?<!model )(?<!coordinate )objective", detail), detail


def test_solver_outcomes_in_plain_words(cli_run):
    cfg, proc = cli_run
    lines = _progress_lines(proc.stdout)
    fixed = [d for _, what, st, d in lines if st == "train" and what.endswith("/global")]
    assert len(fixed) == cfg.iterations and all("converged (gradient ≤ tolerance" in d for d in fixed)
    per_entity = [d for _, what, st, d in lines if st == "train" and not what.endswith("/global")]
    assert all(re.search(r"all \d+ entities converged", d) for d in per_entity), per_entity
    item = [d for _, what, st, d in lines if st == "train" and what == "iter-1/per-item"][0]
    info = storage.done_info(layout.step_dir(cfg.workdir, 1, "per-item"), "train")
    assert info["passive_entities"] > 0 and info["unseen_entities"] > 0  # the config makes some
    assert (f"{info['active_entities']} active, {info['passive_entities']} passive, "
            f"{info['unseen_entities']} unseen in validation") in item


# --- the console itself -----------------------------------------------------------------------

def test_a_terminal_status_line_is_erased_before_other_output():
    out = io.StringIO()
    con = console.Console(out, tty=True)
    con.status("  ... step 1 of 2 train 0.2 s")
    con.write("a line\n")
    text = out.getvalue()
    assert text.startswith("\r  ... step 1 of 2 train 0.2 s\033[K")
    assert text.endswith(console.ERASE + "a line\n")


def test_a_status_line_never_splits_a_line():
    out = io.StringIO()
    con = console.Console(out, tty=False)
    con.write("half a line")  # print() writes the text, then the newline
    con.status("  ... busy")
    con.write("\n")
    con.status("  ... busy")
    assert out.getvalue() == "half a line\n  ... busy\n"


def test_held_output_comes_out_whole_and_only_when_emitted():
    out = io.StringIO()
    con = console.Console(out, tty=False)
    result = {}

    def background():
        result["held"] = con.captured(lambda: (con.write("metrics 1\n"), con.write("metrics 2\n"), 7)[-1])

    t = threading.Thread(target=background)
    t.start()
    t.join(10)
    con.write("main line\n")
    assert out.getvalue() == "main line\n"
    text, value = result["held"]
    assert value == 7
    con.emit(text)
    assert out.getvalue() == "main line\nmetrics 1\nmetrics 2\n"


def test_the_moving_line_shows_sparks_tasks(spark):
    """A real job: the ticker's text names the running stage and its finished tasks."""
    out = io.StringIO()
    con = console.Console(out, tty=False, plain_every_s=0.2)

    def slow(it):
        time.sleep(0.3)
        return it

    job = threading.Thread(target=lambda: spark.sparkContext.parallelize(range(8), 8).mapPartitions(slow).count())
    with con.working("step 1 of 1 test", spark):
        job.start()
        job.join(120)
    lines = out.getvalue().splitlines()
    assert lines and all(ln.startswith("  ... step 1 of 1 test ") for ln in lines)
    assert any(re.search(r"spark stage \d+: \d/8 tasks", ln) for ln in lines), lines
