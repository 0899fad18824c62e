"""A dnn coordinate's settings: its ``dnn`` mapping, validated with errors naming the key
(``coordinates[0].dnn.hidden_units``). No TensorFlow here: prepare and the stage use it."""
from __future__ import annotations

from dataclasses import dataclass

from gdmix.config import Config, ConfigError, Coordinate

# The bag is densified (dense layers over it); beyond this width that costs too much memory.
MAX_DENSE_FEATURES = 20_000


@dataclass(frozen=True)
class DnnSettings:
    hidden_units: tuple[int, ...] = (32,)
    text: str | None = None  # an input string column: the text tower reads it
    text_max_tokens: int = 16  # tokens kept per row (truncated / padded with 0)
    text_embedding_dim: int = 16
    vocab_min_count: int = 2  # words rarer than this in train map to the OOV token
    vocab_max_size: int = 20_000
    learning_rate: float = 0.003
    weight_decay: float = 0.0001  # AdamW's decoupled decay; not part of the reported objective
    batch_size: int = 512  # global mini-batch, split over the workers by row
    epochs: int = 20
    patience: int = 2  # epochs without a better validation AUC before stopping
    seed: int = 0


_INT = ("text_max_tokens", "text_embedding_dim", "vocab_min_count", "vocab_max_size", "batch_size",
        "epochs", "patience")
_FLOAT = ("learning_rate", "weight_decay")


def parse(raw: dict, path: str) -> DnnSettings:
    """Validate a ``dnn`` mapping; ``path`` is its key (``coordinates[0].dnn``)."""
    known = set(DnnSettings.__dataclass_fields__)
    for k in raw:
        if k not in known:
            raise ConfigError(f"{path}.{k}: unknown key (known: {', '.join(sorted(known))})")
    out = {}
    for k in _INT:
        if k in raw:
            v = raw[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{path}.{k}: expected an integer >= 1, got {v!r}")
            out[k] = v
    if "seed" in raw:
        if not isinstance(raw["seed"], int) or isinstance(raw["seed"], bool) or raw["seed"] < 0:
            raise ConfigError(f"{path}.seed: expected an integer >= 0, got {raw['seed']!r}")
        out["seed"] = raw["seed"]
    for k in _FLOAT:
        if k in raw:
            v = raw[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (k == "learning_rate" and v == 0):
                raise ConfigError(f"{path}.{k}: expected a number {'> 0' if k == 'learning_rate' else '>= 0'}, "
                                  f"got {v!r}")
            out[k] = float(v)
    if "hidden_units" in raw:
        v = raw["hidden_units"]
        if not isinstance(v, list) or not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in v):
            raise ConfigError(f"{path}.hidden_units: expected a list of positive integers, got {v!r}")
        out["hidden_units"] = tuple(v)
    if "text" in raw:
        if raw["text"] is not None and (not isinstance(raw["text"], str) or not raw["text"]):
            raise ConfigError(f"{path}.text: expected an input column name, got {raw['text']!r}")
        out["text"] = raw["text"]
    return DnnSettings(**out)


def of(cfg: Config, coord: Coordinate) -> DnnSettings:
    return parse(coord.dnn, f"coordinates[{cfg.coordinates.index(coord)}].dnn")
