"""``make schedule`` replaces a recurring run of the same name instead of adding another.

No KFP API server can run here, so the client is a small fake holding recurring runs in
memory. It answers with the real ``kfp_server_api`` model classes, checks the filter
against the real ``V2beta1Predicate`` model, and every call it receives is bound to the
installed ``kfp.Client`` method's signature, so a call the real client would reject fails
here too.
"""
import inspect
import json
import re

import kfp
import kfp_server_api as api
import pytest

from gdmix.kfp import submit


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.title() for w in rest)


class FakeClient:
    """The kfp.Client methods ``submit schedule`` uses, over an in-memory store."""

    def __init__(self, runs=(), fail_create=False):
        self.calls = []  # (method, args, kwargs), in order
        self.experiments = {"gdmix": "exp-1", "other": "exp-2"}
        self.runs = [api.V2beta1RecurringRun(recurring_run_id=rid, display_name=name, experiment_id=exp)
                     for rid, name, exp in runs]
        self.fail_create = fail_create
        self.created = 0

    def _record(self, method, args, kwargs):
        self.calls.append((method, args, kwargs))

    def create_experiment(self, name, description=None, namespace=None):
        self._record("create_experiment", (name,), {"description": description, "namespace": namespace})
        exp_id = self.experiments.setdefault(name, f"exp-{len(self.experiments) + 1}")
        return api.V2beta1Experiment(experiment_id=exp_id, display_name=name)

    def list_recurring_runs(self, page_token="", page_size=10, sort_by="", experiment_id=None,
                            namespace=None, filter=None):
        self._record("list_recurring_runs", (), dict(page_token=page_token, page_size=page_size,
                                                     experiment_id=experiment_id, filter=filter))
        runs = [r for r in self.runs if experiment_id is None or r.experiment_id == experiment_id]
        for p in json.loads(filter)["predicates"] if filter else ():
            allowed = set(api.V2beta1Predicate.attribute_map.values())
            allowed |= {_camel(k) for k in allowed}
            assert set(p) <= allowed, f"not a Predicate field: {set(p) - allowed}"
            assert p["operation"] in api.V2beta1PredicateOperation.allowable_values
            value = p.get("stringValue", p.get("string_value"))
            if p["operation"] == "EQUALS":
                runs = [r for r in runs if getattr(r, p["key"]) == value]
        start = int(page_token or 0)
        page = runs[start:start + page_size]
        more = start + page_size < len(runs)
        return api.V2beta1ListRecurringRunsResponse(
            recurring_runs=page or None, total_size=len(runs),
            next_page_token=str(start + page_size) if more else None)

    def create_recurring_run(self, experiment_id, job_name, **kwargs):
        self._record("create_recurring_run", (), dict(experiment_id=experiment_id, job_name=job_name, **kwargs))
        if self.fail_create:
            raise RuntimeError("create failed")
        self.created += 1
        run = api.V2beta1RecurringRun(recurring_run_id=f"new-{self.created}", display_name=job_name,
                                      experiment_id=experiment_id, max_concurrency=kwargs["max_concurrency"],
                                      trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(
                                          cron=kwargs["cron_expression"])))
        self.runs.append(run)
        return run

    def delete_recurring_run(self, recurring_run_id):
        self._record("delete_recurring_run", (recurring_run_id,), {})
        before = len(self.runs)
        self.runs = [r for r in self.runs if r.recurring_run_id != recurring_run_id]
        assert len(self.runs) == before - 1, f"no recurring run {recurring_run_id}"
        return {}

    def named(self, name, experiment="exp-1"):
        return sorted(r.recurring_run_id for r in self.runs
                      if r.display_name == name and r.experiment_id == experiment)


def calls_fit_the_real_client(fake):
    for method, args, kwargs in fake.calls:
        real = getattr(kfp.Client, method)
        inspect.signature(real).bind(None, *args, **kwargs)  # raises TypeError if the real one differs


EXISTING = [
    ("old-1", "gdmix-movielens", "exp-1"),
    ("x-1", "something-else", "exp-1"),
    ("old-2", "gdmix-movielens", "exp-1"),
    ("x-2", "gdmix-movielens-v2", "exp-1"),  # a longer name: not the same schedule
    ("x-3", "gdmix-movielens", "exp-2"),  # the same name in another experiment: not ours
    ("old-3", "gdmix-movielens", "exp-1"),
]


@pytest.fixture
def fake(monkeypatch):
    f = FakeClient(EXISTING)
    monkeypatch.setattr(submit, "client", lambda host, namespace=None: f)
    monkeypatch.setattr(submit, "PAGE_SIZE", 2)  # three matches over two pages
    return f


def schedule(*extra):
    return submit.main(["schedule", "--host", "http://kfp.invalid", "--cron", "0 3 * * *", *extra])


def test_schedule_replaces_the_runs_of_the_same_name(fake, capsys):
    assert schedule("--iterations", "0,1") == 0
    assert fake.named("gdmix-movielens") == ["new-1"]  # the pipeline's name, read from the package
    assert fake.named("gdmix-movielens", "exp-2") == ["x-3"]
    assert {r.recurring_run_id for r in fake.runs} == {"new-1", "x-1", "x-2", "x-3"}
    new = next(r for r in fake.runs if r.recurring_run_id == "new-1")
    assert new.trigger.cron_schedule.cron == "0 0 3 * * *" and new.max_concurrency == 1
    methods = [m for m, _, _ in fake.calls]
    # listed first (over two pages), created, and only then the old ones deleted
    assert methods == ["create_experiment", "list_recurring_runs", "list_recurring_runs",
                       "create_recurring_run"] + ["delete_recurring_run"] * 3
    assert [c[2]["page_token"] for c in fake.calls if c[0] == "list_recurring_runs"] == ["", "2"]
    create = next(c[2] for c in fake.calls if c[0] == "create_recurring_run")
    assert create["job_name"] == "gdmix-movielens" and create["params"] == {"iterations": [0, 1]}
    assert create["service_account"] == submit.SERVICE_ACCOUNT
    assert re.search(r"replaced old-1, old-2, old-3", capsys.readouterr().out)
    calls_fit_the_real_client(fake)


def test_scheduling_twice_keeps_one(fake):
    assert schedule() == 0 and schedule("--cron", "30 2 * * *") == 0
    assert fake.named("gdmix-movielens") == ["new-2"]
    assert next(r for r in fake.runs if r.recurring_run_id == "new-2").trigger.cron_schedule.cron == "0 30 2 * * *"
    calls_fit_the_real_client(fake)


def test_an_explicit_name_leaves_other_schedules_alone(fake):
    assert schedule("--name", "nightly") == 0
    assert fake.named("nightly") == ["new-1"]
    assert fake.named("gdmix-movielens") == ["old-1", "old-2", "old-3"]
    assert not [c for c in fake.calls if c[0] == "delete_recurring_run"]
    calls_fit_the_real_client(fake)


def test_a_failed_create_keeps_the_old_schedule(fake):
    fake.fail_create = True
    with pytest.raises(RuntimeError, match="create failed"):
        schedule()
    assert fake.named("gdmix-movielens") == ["old-1", "old-2", "old-3"]
    calls_fit_the_real_client(fake)


def test_the_fake_matches_the_installed_client():
    """Each method the fake stands in for exists on kfp.Client with the parameters used."""
    for method in ("create_experiment", "list_recurring_runs", "create_recurring_run", "delete_recurring_run"):
        real = inspect.signature(getattr(kfp.Client, method)).parameters
        ours = inspect.signature(getattr(FakeClient, method)).parameters
        assert [p for p in ours if p != "kwargs"] == [p for p in real][:len(ours) - ("kwargs" in ours)], method
    # the attributes submit reads from the responses are fields of the real models
    assert {"recurring_runs", "next_page_token"} <= set(api.V2beta1ListRecurringRunsResponse.openapi_types)
    assert {"recurring_run_id", "display_name"} <= set(api.V2beta1RecurringRun.openapi_types)
    assert "experiment_id" in api.V2beta1Experiment.openapi_types


def test_pipeline_name_comes_from_the_package(tmp_path):
    assert submit.pipeline_name(submit.DEFAULT_PACKAGE) == "gdmix-movielens"
    bad = tmp_path / "p.yaml"
    bad.write_text("components: {}\n")
    with pytest.raises(SystemExit, match="no pipelineInfo.name"):
        submit.pipeline_name(str(bad))
