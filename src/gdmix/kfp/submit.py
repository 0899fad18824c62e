"""Upload and run, or schedule, the compiled pipeline on a KFP endpoint (``kfp.Client``).

    python -m gdmix.kfp.submit run      --host URL [--package P] [--config C] [--runs-root R] [--iterations 0,1]
    python -m gdmix.kfp.submit schedule --host URL --cron "0 0 3 * * *" [--name N] [...]

``--host`` defaults to ``$KFP_HOST``. ``schedule`` replaces the experiment's recurring runs of
the same name (default: the compiled pipeline's name), so scheduling again changes the
schedule instead of adding a second retrain. Runs use the ``gdmix-pipeline`` service account
(``manifests/gdmix``), which may create the fixed-effect TFJobs and Spark executors.

``run --wait S`` follows the run for up to S seconds (``wait_for_run``): a line whenever the
run or one of its tasks changes state, a heartbeat naming the running tasks every
``--progress`` seconds, and at the end the failed tasks' errors or, on timeout, what was
still running (exit 0 succeeded, 1 failed/cancelled, 2 still running at the timeout).
kfp.Client's own ``wait_for_run_completion`` prints nothing and never returns for a
cancelled run (its finish states lack CANCELED).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_PACKAGE = str(Path(__file__).resolve().parents[3] / "pipelines" / "gdmix_pipeline.yaml")
SERVICE_ACCOUNT = "gdmix-pipeline"
EXPERIMENT = "gdmix"
PAGE_SIZE = 100  # recurring runs listed per request


def parameters(config: str | None, runs_root: str | None, iterations: str | None) -> dict:
    """Pipeline arguments; those not given keep the compiled defaults."""
    out = {}
    if config:
        out["config"] = config
    if runs_root:
        out["runs_root"] = runs_root
    if iterations:
        try:
            out["iterations"] = [int(v) for v in iterations.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--iterations: expected comma-separated integers, got {iterations!r}") from None
    return out


def client(host: str | None, namespace: str | None = None):
    import kfp

    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise SystemExit("no KFP endpoint: pass --host or set KFP_HOST (e.g. http://localhost:8080 "
                         "after `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`)")
    return kfp.Client(host=host, namespace=namespace)


def cron_expression(cron: str) -> str:
    """KFP takes 6-field cron (with seconds); accept the usual 5 fields too."""
    fields = cron.split()
    if len(fields) == 5:
        return "0 " + cron
    if len(fields) == 6:
        return cron
    raise SystemExit(f"--cron: expected 5 or 6 fields, got {cron!r}")


def pipeline_name(package: str) -> str:
    """The compiled pipeline's name (``pipelineInfo.name``): the default schedule name."""
    import yaml

    try:
        with open(package) as f:
            docs = list(yaml.safe_load_all(f))
    except OSError as e:
        raise SystemExit(f"--package: cannot read {package}: {e}") from None
    for doc in docs:
        name = (doc or {}).get("pipelineInfo", {}).get("name") if isinstance(doc, dict) else None
        if name:
            return name
    raise SystemExit(f"--package: {package} has no pipelineInfo.name (not a compiled KFP pipeline?); "
                     "pass --name")


def recurring_runs_named(kfp_client, experiment_id: str, name: str) -> list:
    """Every recurring run of the experiment whose display name is ``name``, over all pages
    (the server filters by name; the names are checked again here)."""
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found, token = [], ""
    while True:
        page = kfp_client.list_recurring_runs(page_token=token, page_size=PAGE_SIZE,
                                              experiment_id=experiment_id, filter=flt)
        found += [r for r in page.recurring_runs or () if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return found


def schedule(kfp_client, *, name: str, experiment: str, namespace: str | None, cron: str, package: str,
             params: dict, max_concurrency: int, service_account: str):
    """Create the recurring run ``name``, then delete the experiment's older ones of that
    name; returns (the new recurring run, the ids deleted). The old ones are listed first
    and deleted only once the new one exists, so a failed create leaves the old schedule."""
    experiment_id = kfp_client.create_experiment(experiment, namespace=namespace).experiment_id
    old = recurring_runs_named(kfp_client, experiment_id, name)
    job = kfp_client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=cron,
        max_concurrency=max_concurrency, pipeline_package_path=package, params=params,
        service_account=service_account, enable_caching=False)
    deleted = []
    for r in old:
        if r.recurring_run_id != job.recurring_run_id:
            kfp_client.delete_recurring_run(r.recurring_run_id)
            deleted.append(r.recurring_run_id)
    return job, deleted


TERMINAL = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")
EXIT_TIMEOUT = 2


def _state(obj) -> str:
    """A run's or task's state as an upper-case word (``V2beta1RuntimeState`` is a str)."""
    state = getattr(obj, "state", None)
    return str(state or "PENDING").upper().replace("RUNTIME_STATE_", "")


def _tasks(run) -> list:
    details = getattr(run, "run_details", None)
    tasks = getattr(details, "task_details", None) or []
    # KFP lists the run's root DAG and loop nodes as tasks too; keep the steps people named.
    return [t for t in tasks if getattr(t, "display_name", None)]


def _error(obj) -> str:
    err = getattr(obj, "error", None)
    return getattr(err, "message", None) or ""


def wait_for_run(kfp_client, run_id: str, timeout_s: float, poll_s: float = 10.0, progress_s: float = 60.0,
                 out=None, clock=time.monotonic, sleep=time.sleep) -> int:
    """Follow a run until it ends or ``timeout_s`` passes, reporting progress on ``out``.
    Returns 0 (succeeded or skipped), 1 (failed or cancelled) or ``EXIT_TIMEOUT``."""
    out = out if out is not None else sys.stdout
    start = clock()
    seen: dict[str, str] = {}
    last_state, last_said = None, start

    def say(msg: str) -> None:
        out.write(f"[{clock() - start:6.0f} s] {msg}\n")
        out.flush()

    while True:
        run = kfp_client.get_run(run_id)
        state, tasks = _state(run), _tasks(run)
        changed = state != last_state
        if changed:
            say(f"run {state}")
            last_state = state
        for t in tasks:
            key = getattr(t, "task_id", None) or t.display_name
            ts = _state(t)
            if seen.get(key) != ts:
                seen[key] = ts
                changed = True
                say(f"  {t.display_name}: {ts}" + (f" ({_error(t)})" if ts == "FAILED" and _error(t) else ""))
        done = sum(1 for t in tasks if _state(t) in TERMINAL)
        running = sorted({t.display_name for t in tasks if _state(t) == "RUNNING"})
        if state in TERMINAL:
            say(f"run {run_id} {state}: {done}/{len(tasks)} task(s) ended")
            if state in ("FAILED", "CANCELED"):
                failed = [t for t in tasks if _state(t) == "FAILED"]
                for t in failed:
                    say(f"  failed: {t.display_name}" + (f": {_error(t)}" if _error(t) else "")
                        + (f" (pod {t.pod_name})" if getattr(t, "pod_name", None) else ""))
                if _error(run):
                    say(f"  run error: {_error(run)}")
                return 1
            return 0
        now = clock()
        if now - start >= timeout_s:
            say(f"gave up waiting after {timeout_s:g} s: run {run_id} is still {state}, {done}/{len(tasks)} "
                f"task(s) ended" + (f"; running: {', '.join(running)}" if running else "")
                + ". The run goes on in the cluster; a step that stays Pending usually means the cluster "
                "lacks CPU or memory for its requests (kubectl -n kubeflow get pods; describe the Pending one).")
            return EXIT_TIMEOUT
        if changed:
            last_said = now
        elif now - last_said >= progress_s:
            say(f"still {state}: {done}/{len(tasks)} task(s) ended" + (f"; running: {', '.join(running)}" if running
                                                                       else "; none running yet"))
            last_said = now
        sleep(min(poll_s, max(0.0, timeout_s - (now - start))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gdmix.kfp.submit", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("run", "schedule"):
        p = sub.add_parser(name)
        p.add_argument("--host", help="KFP API endpoint (default $KFP_HOST)")
        p.add_argument("--namespace", help="KFP namespace (multi-user installs)")
        p.add_argument("--package", default=DEFAULT_PACKAGE, help="compiled pipeline YAML")
        p.add_argument("--config", help="config parameter (path or URL as the steps see it)")
        p.add_argument("--runs-root", help="runs_root parameter: each run works in <runs_root>/<run id>")
        p.add_argument("--iterations", help="iterations parameter, e.g. 0,1,2")
        p.add_argument("--experiment", default=EXPERIMENT)
        p.add_argument("--service-account", default=SERVICE_ACCOUNT)
        if name == "run":
            p.add_argument("--wait", type=float, default=0, help="seconds to wait for the run to finish (0: don't)")
            p.add_argument("--progress", type=float, default=60,
                           help="with --wait: a progress line at least this often (seconds)")
        else:
            p.add_argument("--cron", required=True, help="cron schedule, 5 or 6 fields")
            p.add_argument("--name", "--job-name", dest="name",
                           help="schedule name; an existing one of this name in the experiment is "
                                "replaced (default: the compiled pipeline's name)")
            p.add_argument("--max-concurrency", type=int, default=1)
    args = ap.parse_args(argv)
    params = parameters(args.config, args.runs_root, args.iterations)
    cron = cron_expression(args.cron) if args.command == "schedule" else None
    name = (args.name or pipeline_name(args.package)) if args.command == "schedule" else None
    kfp_client = client(args.host, args.namespace)
    if args.command == "run":
        result = kfp_client.create_run_from_pipeline_package(
            args.package, arguments=params, experiment_name=args.experiment,
            service_account=args.service_account, enable_caching=False)
        print(f"run {result.run_id} started: {kfp_client._get_url_prefix()}/#/runs/details/{result.run_id}")
        if args.wait:
            return wait_for_run(kfp_client, result.run_id, args.wait, progress_s=args.progress)
        return 0
    job, deleted = schedule(kfp_client, name=name, experiment=args.experiment, namespace=args.namespace,
                            cron=cron, package=args.package, params=params,
                            max_concurrency=args.max_concurrency, service_account=args.service_account)
    print(f"recurring run {name!r} ({job.recurring_run_id}) created: cron {cron!r}"
          + (f"; replaced {', '.join(deleted)}" if deleted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
