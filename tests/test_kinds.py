"""Every registered coordinate kind, trained through the CLI stage commands in plan
order (what a pipeline's tasks do, each through the one training dispatcher), gives the
embedded driver's models and metrics."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from gdmix import cli, config, driver, kinds, layout, plan, storage
from test_pipeline_local import model_values, small_problem

pytestmark = pytest.mark.slow

PER_USER = {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
            "l2": 2.0, "shards": 2}
CASES = {
    "linear+per_entity+per_cohort": ([
        {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0, "workers": 1},
        PER_USER,
        {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_user",
         "l2": 3.0, "solver": "data_parallel", "shards": 2}], 2),
    "dnn+per_entity": ([
        {"name": "global", "type": "fixed_effect", "feature_bag": "global", "model": "dnn", "workers": 1,
         "dnn": {"hidden_units": [4], "epochs": 2, "batch_size": 256}}, PER_USER], 1),
    "external+per_entity(auto)": ([
        {"name": "mine", "type": "fixed_effect", "feature_bag": "global", "model": "external",
         "external_scores": "ext"}, {**PER_USER, "solver": "auto"}], 1),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    small_problem(root)
    path = root / "train" / "part-0.parquet"
    t = pq.read_table(path)
    pq.write_table(t.append_column("ext", t.column("x1")), path)  # a user's own score column
    return root / "train"


def cli_in_plan_order(cfg: config.Config) -> None:
    def run(*argv):
        assert cli.main(list(argv)) == 0, argv

    run("prepare", "--config", cfg.source, "--workdir", cfg.workdir)
    for step in plan.sequence(cfg):  # each pass's joint step too (docs/design.md §2.5)
        where = ["--workdir", cfg.workdir, "--iteration", str(step.iteration), "--coordinate", step.coordinate]
        if plan.is_joint(step):
            run("train", *where)
            run("metrics", *where)
            continue
        run("partition", *where)
        kind = kinds.of(cfg.coordinate(step.coordinate))
        if kind.pipeline_tasks == kinds.SHARDED:
            for s in range(cfg.coordinate(step.coordinate).shards):
                run("train", *where, "--shard", str(s))
            run("train", *where, "--finish")
        else:
            run("train", *where)
        run("metrics", *where)
    run("finalize", "--workdir", cfg.workdir)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_stage_commands_give_the_embedded_models(case, data, tmp_path, spark):
    coords, iterations = CASES[case]
    raw = {"name": "kinds", "workdir": str(tmp_path / "embedded"),
           "data": {"train": str(data), "validation_fraction": 0.25,
                    "feature_bags": {"global": {"columns": ["x0", "x1", "x2"]}, "per_user": {"columns": ["x0"]}}},
           "iterations": iterations, "coordinates": coords, "parallelism": 1}
    path = tmp_path / "config.yaml"
    path.write_text(__import__("yaml").safe_dump(raw))
    embedded = kinds.load_config(str(path))
    driver.run(embedded, spark=spark)
    staged = kinds.load_config(str(path), workdir=str(tmp_path / "staged"))
    cli_in_plan_order(staged)

    used = {kinds.for_step(staged, staged.workdir, s).name for s in plan.steps(staged)}
    assert used == {kinds.of(c).name for c in staged.coordinates}
    for c in staged.coordinates:
        if kinds.of(c).name in ("dnn",):  # a Keras model: compared through its metrics below
            continue
        ours, theirs = model_values(staged.workdir, c.name), model_values(embedded.workdir, c.name)
        assert ours.keys() == theirs.keys()
        if ours:
            diff = max(abs(ours[k] - theirs[k]) for k in ours)
            assert diff <= 1e-8, f"{c.name}: coefficients differ by {diff}"
    a, b = (storage.read_json(layout.metrics(w)) for w in (staged.workdir, embedded.workdir))
    assert [(r["iteration"], r["coordinate"]) for r in a] == [(r["iteration"], r["coordinate"]) for r in b]
    tol = 1e-6 if "dnn" in case else 1e-9
    for ra, rb in zip(a, b):
        assert np.isclose(ra["auc"], rb["auc"], rtol=tol) and np.isclose(ra["objective"], rb["objective"], rtol=tol)


def test_every_registered_kind_is_covered():
    cfgs = [config.parse({"name": "x", "workdir": "/tmp/x",
                          "data": {"train": "t", "feature_bags": {"global": {"columns": ["x0"]},
                                                                  "per_user": {"columns": ["x0"]}}},
                          "coordinates": coords}) for coords, _ in CASES.values()]
    covered = {kinds.of(c).name for cfg in cfgs for c in cfg.coordinates}
    assert covered == {k.name for k in kinds.REGISTRY}


def test_a_kind_name_that_names_no_kind_is_a_config_error():
    raw = {"name": "x", "workdir": "/tmp/x",
           "data": {"train": "t", "feature_bags": {"g": {"columns": ["x0"]}}},
           "coordinates": [{"name": "u", "type": "random_effect", "entity": "u", "feature_bag": "g",
                            "solver": "newton"}]}
    with pytest.raises(config.ConfigError, match=r"coordinates\[0\]\.solver: must be one of .*vectorised"):
        kinds.parse_config(raw)
    raw["coordinates"][0] = {"name": "g", "type": "fixed_effect", "feature_bag": "g", "model": "external"}
    with pytest.raises(config.ConfigError, match=r"coordinates\[0\]\.external_scores: required"):
        kinds.parse_config(raw)
