import pytest
import yaml

from gdmix import config
from helpers import raw_config


def test_defaults_and_types(tmp_path):
    cfg = config.parse(raw_config(tmp_path))
    fe, re_ = cfg.coordinates
    assert fe.is_fixed_effect and not fe.regularize_intercept
    assert re_.regularize_intercept and re_.entity == "user_id" and re_.shards == 2
    assert cfg.fixed_effect is fe
    assert cfg.data.columns.weight == "weight"


@pytest.mark.parametrize("patch, message", [
    (lambda r: r.pop("coordinates"), "coordinates: expected a non-empty list"),
    (lambda r: r["coordinates"][1].update(l2=-1), "coordinates[1].l2: must be >= 0"),
    (lambda r: r["coordinates"][1].update(l2="big"), "coordinates[1].l2: expected float"),
    (lambda r: r["coordinates"][1].pop("entity"), "coordinates[1].entity: required key is missing"),
    (lambda r: r["coordinates"][0].update(feature_bag="nope"), "coordinates[0].feature_bag: no feature bag named 'nope'"),
    (lambda r: r["coordinates"][0].update(typo=1), "coordinates[0].typo: unknown key"),
    (lambda r: r["data"]["feature_bags"]["g"].update(ntv="x"), "data.feature_bags.g: give exactly one"),
    (lambda r: r["data"].update(validation_fraction=1.5), "data.validation_fraction: must be between 0 and 1"),
    (lambda r: r["data"].pop("train"), "data.train: required key is missing"),
    (lambda r: r["coordinates"].append(dict(r["coordinates"][1])), "coordinates[2].name: duplicate"),
    (lambda r: r.update(metrics=["auc", "f1"]), "metrics[1]: unknown metric 'f1'"),
    (lambda r: r.update(iterations=0), "iterations: must be > 0"),
])
def test_errors_name_the_key(tmp_path, patch, message):
    raw = raw_config(tmp_path)
    patch(raw)
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.parse(raw)


def test_load_names_the_file_and_snapshot_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    raw = raw_config(tmp_path / "wd")
    raw["coordinates"][0]["l2"] = "x"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(config.ConfigError, match=f"{path}: coordinates\\[0\\].l2"):
        config.load(str(path))
    raw["coordinates"][0]["l2"] = 3.0
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(str(path))
    config.snapshot(cfg)
    again = config.load_run(str(tmp_path / "wd"))
    assert config.to_raw(again) == config.to_raw(cfg)
    assert again.coordinates == cfg.coordinates


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(str(tmp_path / "none.yaml"))


def test_bags_share_values_by_column():
    from gdmix.config import FeatureBag

    cols_a = FeatureBag("a", columns=("x", "y", "z"))
    cols_b = FeatureBag("b", columns=("y",))
    ntv_a, ntv_b = FeatureBag("n", ntv="f"), FeatureBag("m", ntv="g")
    assert cols_a.shares_values_with(cols_b)  # the column y is the same in both
    assert ntv_a.shares_values_with(FeatureBag("n2", ntv="f"))
    assert not ntv_a.shares_values_with(ntv_b)
    assert not ntv_a.shares_values_with(cols_a)
