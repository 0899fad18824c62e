"""The config reference (issue 14): the README's table and docs/gdmix-config.schema.json are
rendered from the key declarations the loader reads by (``gdmix.config_spec``) and must be
current; the JSON Schema accepts every example and rejects what the loader rejects; the
README's config examples load and name columns the MovieLens data has."""
from __future__ import annotations

import copy
import dataclasses
import glob
import re
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml

from gdmix import config, config_reference, config_spec, kinds, storage
from gdmix.config_keys import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(ROOT / "examples" / "*.yaml")))
VALIDATOR = jsonschema.Draft202012Validator(config_reference.json_schema())


def test_the_readme_table_and_the_json_schema_are_current():
    readme = (ROOT / "README.md").read_text()
    assert config_reference.with_table(readme) == readme, \
        "README.md's config table is stale: run python scripts/config_reference.py"
    assert (ROOT / config_reference.SCHEMA_PATH).read_text() == config_reference.json_schema_text(), \
        f"{config_reference.SCHEMA_PATH} is stale: run python scripts/config_reference.py"


def test_the_json_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(config_reference.json_schema())


def test_the_table_has_a_row_for_every_declared_key():
    table = config_reference.markdown()
    for key in ("split_seed", "validation_fraction", "coordinates[].hessian", "coordinates[].dnn.text",
                "spark.conf", "timeouts.metrics_seconds", "publish.max_auc_drop", "prior.weight"):
        assert f"`{key}`" in table or f".{key}`" in table, key
    assert table.count("\n") + 1 == 2 + sum(1 for _ in config_reference._rows(config_spec.TOP, ""))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).name)
def test_every_example_loads_and_matches_the_json_schema(path):
    raw = yaml.safe_load(open(path))
    assert list(VALIDATOR.iter_errors(raw)) == []
    kinds.parse_config(raw)


def _example():
    return yaml.safe_load(open(ROOT / "examples" / "movielens.yaml"))


BAD = [  # (change to examples/movielens.yaml, the loader's message)
    (lambda r: r.update(colour="red"), "colour: unknown key"),
    (lambda r: r["coordinates"][1].update(l2="big"), "coordinates[1].l2: expected float"),
    (lambda r: r["coordinates"][1].update(l2=-1), "coordinates[1].l2: must be >= 0"),
    (lambda r: r["coordinates"][1].update(workers=2), "coordinates[1].workers: unknown key"),
    (lambda r: r["coordinates"][0].update(solver="scipy"), "coordinates[0].solver: unknown key"),
    (lambda r: r["coordinates"][1].pop("entity"), "coordinates[1].entity: required key is missing"),
    (lambda r: r["coordinates"][0].update(type="mixed"), "coordinates[0].type: must be one of"),
    (lambda r: r["coordinates"][0].update(variance="some"), "coordinates[0].variance: must be one of"),
    (lambda r: r["coordinates"][0].update(memory="2 GB"), "coordinates[0].memory: expected a Kubernetes quantity"),
    (lambda r: r["coordinates"][0].update(dnn={"epoch": 3}, model="dnn"), "coordinates[0].dnn.epoch: unknown key"),
    (lambda r: r["coordinates"][0].update(dnn={"learning_rate": 0}, model="dnn"),
     "coordinates[0].dnn.learning_rate: must be > 0"),
    (lambda r: r["data"].update(validation_fraction=1.5), "data.validation_fraction: must be between 0 and 1"),
    (lambda r: r["data"].update(split_seed="one"), "data.split_seed: expected int"),
    (lambda r: r["data"]["feature_bags"]["global"].update(ntv="x"), "data.feature_bags.global: give exactly one"),
    (lambda r: r["data"]["feature_bags"].update({"a b": {"columns": ["age"]}}),
     "data.feature_bags.a b: use letters, digits"),
    (lambda r: r.pop("workdir"), "workdir: required key is missing"),
    (lambda r: r.update(iterations=0), "iterations: must be > 0"),
    (lambda r: r.update(spark={"master": "local[two]"}), "spark.master: expected local"),
    (lambda r: r.update(spark={"driver_memory": "4 GB"}), "spark.driver_memory: expected a JVM memory size"),
    (lambda r: r.update(publish={"min_auc": 0.7}), "publish.to: required key is missing"),
    (lambda r: r.update(metrics=["auc", "f1"]), "metrics[1]: unknown metric 'f1'"),
]


@pytest.mark.parametrize("patch, message", BAD, ids=[m.split(":")[0] + ":" + m.split(":")[1][:20] for _, m in BAD])
def test_the_json_schema_rejects_what_the_loader_rejects(patch, message):
    raw = _example()
    patch(raw)
    with pytest.raises(ConfigError, match=re.escape(message)):
        kinds.parse_config(copy.deepcopy(raw))
    assert list(VALIDATOR.iter_errors(raw)), f"the JSON Schema accepts what the loader rejects: {message}"


def test_the_declared_choices_are_the_kinds_registry():
    fixed = [v for k in kinds.REGISTRY if k.type == config.FIXED_EFFECT for v in k.selector]
    per_entity = [v for k in kinds.REGISTRY if k.type == config.RANDOM_EFFECT for v in k.selector] + [kinds.AUTO]
    assert list(config_spec.MODELS) == fixed and list(config_spec.SOLVERS) == per_entity


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("cls, keys", [
    (config.Columns, config_spec.COLUMNS), (config.Spark, config_spec.SPARK), (config.Timeouts, config_spec.TIMEOUTS),
    (config.Publish, config_spec.PUBLISH), (config.Prior, config_spec.PRIOR), (config.Data, config_spec.DATA),
    (config.Config, config_spec.TOP),
    (config.Coordinate, config_spec.COORDINATE + config_spec.FIXED_EFFECT_KEYS),
    (config.Coordinate, config_spec.COORDINATE + tuple(k for k in config_spec.RANDOM_EFFECT_KEYS
                                                       if k.name != "regularize_intercept")),
], ids=lambda x: getattr(x, "__name__", ""))
def test_the_dataclasses_defaults_are_the_declared_ones(cls, keys):
    """Code that builds a Config directly gets what a config file without the key gets."""
    defaults = _defaults(cls)
    for key in keys:
        if key.required or key.keys or key.name not in defaults:
            continue
        want = tuple(key.default) if isinstance(key.default, list) else key.default
        assert defaults[key.name] == want, (cls.__name__, key.name)


# The README: every YAML block that is a whole config loads, matches the JSON Schema and
# names only columns the MovieLens data of `gdmix movielens` has. A block in the docs that
# is part of a config (`publish:`...) loads when added to examples/movielens.yaml.
def _yaml_blocks(path: Path) -> list[dict]:
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)]
    return [b for b in blocks if isinstance(b, dict)]


def _readme_configs() -> list[dict]:
    return [b for b in _yaml_blocks(ROOT / "README.md") if "coordinates" in b]


def _doc_fragments() -> list[tuple[str, dict]]:
    return [(p.name, b) for p in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
            for b in _yaml_blocks(p) if "coordinates" not in b and set(b) <= {k.name for k in config_spec.TOP}]


def _movielens_columns() -> set[str]:
    train = ROOT / "data" / "ml100k" / "train"
    if train.exists():
        return set(pq.read_schema(storage.input_files(str(train))[0]).names)
    example = _example()  # without the data: the columns the checked-in example reads
    cols = {c for b in example["data"]["feature_bags"].values() for c in b["columns"]}
    return cols | {"uid", "label", "user_id", "movie_id", "occupation", "title"}


def test_the_readme_has_a_config_example_and_the_docs_fragments():
    assert len(_readme_configs()) >= 1
    assert any("publish" in b for _, b in _doc_fragments())


@pytest.mark.parametrize("index", range(len(_readme_configs())))
def test_the_readmes_configs_load_and_fit_the_movielens_data(index):
    raw = _readme_configs()[index]
    assert list(VALIDATOR.iter_errors(raw)) == []
    cfg = kinds.parse_config(raw)
    have = _movielens_columns()
    named = {c for b in cfg.data.feature_bags.values() for c in b.source}
    named |= {c.entity for c in cfg.coordinates if c.entity} | {cfg.data.columns.uid, cfg.data.columns.label}
    assert named <= have, f"README config {index} names columns the MovieLens data lacks: {sorted(named - have)}"
    assert cfg.data.train.endswith("ml100k/train")


@pytest.mark.parametrize("doc, fragment", _doc_fragments(), ids=lambda x: x if isinstance(x, str) else "")
def test_the_docs_config_fragments_load(doc, fragment):
    raw = {**_example(), **fragment}
    assert list(VALIDATOR.iter_errors(raw)) == [], doc
    kinds.parse_config(raw)
