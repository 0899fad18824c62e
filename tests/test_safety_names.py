"""Names that become paths (feature bags, coordinates) follow one rule (issue 17, case 5)."""
from __future__ import annotations

import pytest

from gdmix import config
from helpers import raw_config


def _with_bag(tmp_path, bag):
    raw = raw_config(tmp_path)
    raw["data"]["feature_bags"] = {bag: {"columns": ["a"]}, "u": {"columns": ["b"]}}
    raw["coordinates"][0]["feature_bag"] = bag
    return raw


@pytest.mark.parametrize("bag", ["../../../escape", "a/b", "x.y", "", "name with space", "é"])
def test_bag_name_that_is_not_a_plain_name_is_a_config_error(tmp_path, bag):
    with pytest.raises(config.ConfigError) as e:
        config.parse(_with_bag(tmp_path, bag))
    assert str(e.value).startswith(f"data.feature_bags.{bag}: use letters, digits, '-' and '_' only")


@pytest.mark.parametrize("name", ["../up", "a/b", "é"])
def test_coordinate_name_follows_the_same_rule(tmp_path, name):
    raw = raw_config(tmp_path)
    raw["coordinates"][1]["name"] = name
    with pytest.raises(config.ConfigError, match=r"coordinates\[1\]\.name: use letters, digits"):
        config.parse(raw)


def test_plain_names_pass(tmp_path):
    cfg = config.parse(_with_bag(tmp_path, "Bag_1-x"))
    assert "Bag_1-x" in cfg.data.feature_bags
