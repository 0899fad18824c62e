"""``gdmix``: the command line over the stage functions.

    gdmix run CONFIG [--workdir DIR] [--restart]       the whole run, embedded
    gdmix prepare --config CONFIG --workdir DIR         one stage (what a KFP step runs)
    gdmix partition|train|metrics --workdir DIR --iteration K --coordinate C
    gdmix train ... [--shard S | --finish]              one shard of a sharded kind, or their finish
    gdmix finalize --workdir DIR                        metrics.json, models/, report.html
    gdmix publish --workdir DIR                         a finished run to publish.to, gated on AUC
    gdmix plan CONFIG                                   the coordinate-descent steps, as JSON
    gdmix score CONFIG --data PATH --out PATH [--workdir DIR]
    gdmix init --data FILE [--out CONFIG] | gdmix check CONFIG     your own data: a starter config, a dry check
    gdmix movielens --out DIR | gdmix synth --out DIR [...]
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from gdmix import config as gconfig
from gdmix.plan import Step


def _config(args) -> gconfig.Config:
    from gdmix import kinds

    if getattr(args, "config", None):
        return kinds.load_config(args.config, workdir=getattr(args, "workdir", None))
    return kinds.validate(gconfig.load_run(args.workdir))


def _step(args, cfg) -> Step:
    from gdmix import plan

    if args.coordinate != plan.JOINT or not plan.accelerated(cfg):  # the joint step: when the run has one
        cfg.coordinate(args.coordinate)  # a clear error for an unknown coordinate
    if not 0 <= args.iteration < cfg.iterations:
        raise gconfig.ConfigError(f"--iteration: must be in 0..{cfg.iterations - 1}, got {args.iteration}")
    return Step(args.iteration, args.coordinate)


def _spark(cfg):
    from gdmix import spark

    return spark.session(cfg, app=f"gdmix-{cfg.name}")


def _launcher():
    """What runs TF workers: local processes, or a TFJob inside a cluster (``GDMIX_LAUNCHER``)."""
    from gdmix.kfp import tfjob

    return tfjob.select()


def cmd_run(args):
    from gdmix import driver, kinds

    driver.run(kinds.load_config(args.config, workdir=args.workdir), restart=args.restart, launcher=_launcher())


def cmd_prepare(args):
    from gdmix import kinds, stages

    cfg = kinds.load_config(args.config, workdir=args.workdir)
    gconfig.snapshot(cfg)
    return stages.prepare(cfg, cfg.workdir, _spark(cfg))


def cmd_grid_point(args):
    """A pipeline branch of an l2 grid: prepare the point's own work directory
    ``<workdir>/grid/<coordinate>=<λ>`` with the config at that λ (gdmix.grid)."""
    from gdmix import grid, kinds, stages

    cfg = kinds.load_config(args.config, workdir=args.workdir)
    if not _exists(gconfig.RUN_CONFIG, cfg.workdir):  # what grid-select reads
        gconfig.snapshot(cfg)
    point = grid.cluster_point(cfg, args.coordinate, args.l2)
    gconfig.snapshot(point)
    return stages.prepare(point, point.workdir, _spark(point))


def cmd_grid_select(args):
    """After an l2 grid's branches for one coordinate: keep the best (gdmix.grid.select)."""
    from gdmix import grid

    doc = grid.select(_config(args), args.coordinate)
    return {"metric": doc["metric"], "chosen": doc["chosen"], "chosen_workdir": doc["chosen_workdir"]}


def _exists(name: str, workdir: str) -> bool:
    from gdmix import storage

    return storage.exists(storage.join(workdir, name))


def cmd_partition(args):
    from gdmix import stages

    from gdmix.partition import require_complete

    cfg = _config(args)
    step = _step(args, cfg)
    require_complete(cfg, cfg.workdir, step)  # refuse before paying for a Spark start
    return stages.partition(cfg, cfg.workdir, step, _spark(cfg))


def cmd_train(args, effect: str | None = None):
    """Every kind's training through the one dispatcher (``stages.train``); ``effect``:
    the older commands ``fixed-effect`` / ``random-effect``, which also check the type."""
    from gdmix import kinds, plan, stages

    cfg = _config(args)
    step = _step(args, cfg)
    if plan.is_joint(step):  # the joint Newton step (gdmix.accelerate): no kind, no TF workers
        if effect is not None:
            raise gconfig.ConfigError(f"--coordinate: {step.coordinate!r} is the joint step: use gdmix train")
        return stages.train(cfg, cfg.workdir, step)
    coord = cfg.coordinate(step.coordinate)
    if effect is not None and coord.type != effect:
        raise gconfig.ConfigError(f"--coordinate: {step.coordinate!r} is not a {effect.replace('_', ' ')}")
    # Only kinds on TF workers launch any (the launcher module loads scipy and TF's settings).
    tf = kinds.for_step(cfg, cfg.workdir, step).tf_workers
    ctx = kinds.TrainContext(launcher=_launcher() if tf else None)
    return stages.train(cfg, cfg.workdir, step, ctx, shard=getattr(args, "shard", None),
                        finish=getattr(args, "finish", False))


def cmd_fixed_effect(args):
    return cmd_train(args, gconfig.FIXED_EFFECT)


def cmd_random_effect(args):
    return cmd_train(args, gconfig.RANDOM_EFFECT)


def cmd_metrics(args):
    from gdmix import stages

    cfg = _config(args)
    return stages.metrics(cfg, cfg.workdir, _step(args, cfg), _spark(cfg))


def cmd_finalize(args):
    from gdmix import stages

    cfg = _config(args)
    out = stages.finalize(cfg, cfg.workdir)
    return {"models": out["models"], "report": out["report"]}


def cmd_plan(args):
    from gdmix import kinds, plan

    cfg = kinds.load_config(args.config)

    def kind(s):  # the joint step is no coordinate's: it has a type and kind of its own
        if plan.is_joint(s):
            return {"type": "joint", "kind": "newton"}
        c = cfg.coordinate(s.coordinate)
        return {"type": c.type, "kind": kinds.of(c).name}

    return [{"iteration": s.iteration, "coordinate": s.coordinate, **kind(s), "writes": list(plan.writes(cfg, s))}
            for s in plan.sequence(cfg)]


def cmd_score(args):
    from gdmix import kinds, models

    cfg = kinds.load_config(args.config, workdir=args.workdir)
    return models.score(cfg, cfg.workdir, args.data, args.out, _spark(cfg))


def cmd_init(args):
    from gdmix import starter

    try:
        return starter.init(args.data, args.out, force=args.force)
    except FileExistsError as e:
        raise SystemExit(f"gdmix: {e}") from None


def cmd_check(args):
    from gdmix import starter

    return starter.check(args.config)


def cmd_movielens(args):
    from gdmix.data import movielens

    raw = movielens.fetch(args.cache)
    if args.daily:
        return movielens.daily(raw, args.out)
    return movielens.convert(raw, args.out, seed=args.seed)


def cmd_synth(args):
    from gdmix.data import synthetic

    return synthetic.generate(args.out, n_rows=args.rows, n_users=args.users, n_items=args.items, seed=args.seed,
                              n_global=args.global_features, n_user_features=args.user_features)


def _stage_args(p, step=True, config_required=False):
    p.add_argument("--config", required=config_required, help="run config YAML (default: <workdir>/config.yaml)")
    p.add_argument("--workdir", required=True, help="work directory: local path, gs://… or any fsspec URL")
    if step:
        p.add_argument("--iteration", type=int, required=True, help="coordinate-descent pass, from 0")
        p.add_argument("--coordinate", required=True, help="coordinate name from the config")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gdmix", description="GLMix / GDMix training by coordinate descent")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline embedded (local Spark, local TF workers)")
    p.add_argument("config")
    p.add_argument("--workdir", help="override the config's workdir")
    p.add_argument("--restart", action="store_true", help="discard earlier outputs in the workdir")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prepare", help="stage: check input, build feature indexes, index rows, split")
    _stage_args(p, step=False, config_required=True)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("grid-point", help="stage: prepare one point of an l2 grid (a pipeline branch)")
    _stage_args(p, step=False, config_required=True)
    p.add_argument("--coordinate", required=True, help="the gridded coordinate searched")
    p.add_argument("--l2", required=True, type=float, help="this point's λ, one of the coordinate's grid")
    p.set_defaults(func=cmd_grid_point)
    p = sub.add_parser("grid-select", help="stage: after a coordinate's grid points, keep the best")
    _stage_args(p, step=False)
    p.add_argument("--coordinate", required=True, help="the gridded coordinate searched")
    p.set_defaults(func=cmd_grid_select)
    for name, func, text in (
        ("partition", cmd_partition, "stage: offsets from the other coordinates, rows sharded"),
        ("train", cmd_train, "stage: train the step's coordinate (as its kind trains), score"),
        ("fixed-effect", cmd_fixed_effect, "stage: train a fixed effect (train, for fixed effects only)"),
        ("random-effect", cmd_random_effect, "stage: train a random effect (train, for random effects only)"),
        ("metrics", cmd_metrics, "stage: validation AUC, log loss and the training objective"),
    ):
        p = sub.add_parser(name, help=text)
        _stage_args(p)
        if name in ("train", "random-effect"):
            g = p.add_mutually_exclusive_group()
            g.add_argument("--shard", type=int, help="a sharded kind: train only this shard")
            g.add_argument("--finish", action="store_true", help="a sharded kind, after all shards: combine and score")
        p.set_defaults(func=func)
    p = sub.add_parser("finalize", help="stage: metrics.json, models/, report.html")
    _stage_args(p, step=False)
    p.set_defaults(func=cmd_finalize)

    p = sub.add_parser("plan", help="print the coordinate-descent steps as JSON")
    p.add_argument("config")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("score", help="score Parquet rows with the trained models")
    p.add_argument("config")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("init", help="write a starter config from a Parquet file's columns")
    p.add_argument("--data", required=True, help="a Parquet file or folder of your rows")
    p.add_argument("--out", default="gdmix.yaml", help="the config to write (default: gdmix.yaml)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("check", help="validate a config and its data's columns without training")
    p.add_argument("config")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("movielens", help="fetch MovieLens-100K and convert it to the input format")
    p.add_argument("--out", default="data/ml100k")
    p.add_argument("--cache", default="data/cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--daily", action="store_true",
                   help="time slices for the nightly-retrain example (day1/, day2/) instead of a random split")
    p.set_defaults(func=cmd_movielens)

    p = sub.add_parser("synth", help="generate a synthetic GLMix problem with known coefficients")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--global-features", type=int, default=5, help="global features (g, j); the per-user bag has these too")
    p.add_argument("--user-features", type=int, default=4, help="user features (u, j)")
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("publish", help="copy the finished run to publish.to as a version; move latest "
                       "if the AUC gates hold (exit 3 if refused)")
    _stage_args(p, step=False)
    p.set_defaults(func=cmd_publish)
    return ap


def cmd_publish(args):
    from gdmix.publish import publish

    cfg = _config(args)
    return publish(cfg, cfg.workdir)


# Stage commands that write into the work directory: refused while a `gdmix run` holds it.
_WRITING = ("prepare", "partition", "train", "fixed-effect", "random-effect", "metrics", "finalize", "publish")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("GDMIX_DEBUG", "") not in ("", "0")
    args = parser().parse_args([a for a in argv if a != "--debug"])
    try:
        if args.command in _WRITING:
            from gdmix import lock

            lock.check_free(args.workdir, f"gdmix {args.command}")
        result = args.func(args)
    except gconfig.ConfigError as e:
        print(f"gdmix: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug: the trace
        known = _stage_error(e)
        if known is not None:
            print(f"gdmix: {known[0]}: {e}", file=sys.stderr)
            return known[1]
        if debug:
            raise
        print(f"gdmix: {failure_line(e)} (--debug shows the trace)", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


# The stages' own errors: (module, class, what the line says, exit code).
_STAGE_ERRORS = (("gdmix.checks", "InputError", "bad input", 2),
                 ("gdmix.partition", "OutOfOrderError", "out of order", 2),
                 ("gdmix.publish", "PublishRefused", "publish refused", 3))


def _stage_error(e: BaseException) -> tuple[str, int] | None:
    """(what, exit code) when ``e`` is one of the stages' own errors. Looked up among the
    modules already loaded (a stage raising one has loaded its module): importing them
    up front would load Spark into every command, the random-effect shards included."""
    for module, name, what, code in _STAGE_ERRORS:
        m = sys.modules.get(module)
        if m is not None and isinstance(e, getattr(m, name)):
            return what, code
    return None


def failure_line(e: BaseException) -> str:
    """One line for a failure the stages do not phrase themselves (exit code 1)."""
    from gdmix.lock import LockHeld
    from gdmix.storage import DamagedOutput

    if isinstance(e, LockHeld):
        return f"work directory in use: {e}"
    if isinstance(e, DamagedOutput):
        return f"damaged output: {e}"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}: is the work directory (or --out) writable?"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device: {e.filename or e}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else f"{e.strerror}"
    text = str(e)
    if "JAVA_GATEWAY_EXITED" in text or "Java gateway process exited" in text:
        return ("Spark could not start (the Java gateway exited): check spark.master and "
                "spark.driver_memory in the config, and that a Java runtime is installed")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("at ")]
    # py4j: "An error occurred while calling o1.x." then ": <java exception>: <message>"
    java = [ln for ln in lines if ln.startswith(": ")]
    head = java[0][2:] if java else (lines[0] if lines else "")
    if "Could not parse Master URL" in text or "Master must either be" in text:
        return f"spark.master: Spark cannot use it ({head})"
    head = head if len(head) <= 400 else head[:400] + " ..."
    return f"{type(e).__name__}: {head}" if head else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
