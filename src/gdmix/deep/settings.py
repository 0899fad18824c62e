"""A dnn coordinate's settings: its ``dnn`` mapping, validated with errors naming the key
(``coordinates[0].dnn.hidden_units``). No TensorFlow here: prepare and the stage use it."""
from __future__ import annotations

from dataclasses import dataclass

from gdmix.config import Config, Coordinate
from gdmix.config_keys import Section
from gdmix.config_spec import DNN

# The bag is densified (dense layers over it); beyond this width that costs too much memory.
MAX_DENSE_FEATURES = 20_000


@dataclass(frozen=True)
class DnnSettings:
    """The ``dnn`` keys, declared with their defaults and meanings in ``gdmix.config_spec.DNN``."""
    hidden_units: tuple[int, ...]
    text: str | None  # an input string column: the text tower reads it
    text_max_tokens: int  # tokens kept per row (truncated / padded with 0)
    text_embedding_dim: int
    vocab_min_count: int  # words rarer than this in train map to the OOV token
    vocab_max_size: int
    learning_rate: float
    weight_decay: float  # AdamW's decoupled decay; not part of the reported objective
    batch_size: int  # global mini-batch, split over the workers by row
    epochs: int
    patience: int  # epochs without a better validation AUC before stopping
    seed: int


def parse(raw: dict, path: str) -> DnnSettings:
    """Validate a ``dnn`` mapping; ``path`` is its key (``coordinates[0].dnn``)."""
    sec = Section(raw, path, DNN)
    settings = DnnSettings(**{k.name: sec.get(k.name) for k in DNN})
    sec.finish()
    return settings


def of(cfg: Config, coord: Coordinate) -> DnnSettings:
    return parse(coord.dnn, f"coordinates[{cfg.coordinates.index(coord)}].dnn")
