"""Small builders shared by tests: configs and hand-made work directories."""
from __future__ import annotations

import copy

from gdmix import config


def raw_config(workdir, train="unused", iterations=2, **over):
    raw = {
        "name": "t",
        "workdir": str(workdir),
        "data": {"train": str(train), "feature_bags": {
            "g": {"columns": ["a", "b"]},
            "u": {"columns": ["b"]},
        }},
        "iterations": iterations,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "g", "l2": 1.0},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "u",
             "l2": 2.0, "shards": 2},
        ],
    }
    raw = copy.deepcopy(raw)
    raw.update(over)
    return raw


def make_config(workdir, **over) -> config.Config:
    return config.parse(raw_config(workdir, **over))
