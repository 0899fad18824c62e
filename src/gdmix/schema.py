"""Column names and Arrow schemas of the files stages hand to each other (docs/design.md §4.5).

Prepared rows (``prepared/{train,validation}``): ``uid`` int64, ``label`` float64 (0/1),
``weight`` float64, ``offset`` float64 (input names mapped to these), the entity id columns
as in the input, and per feature bag ``<bag>_indices`` list<int32> (ascending) and
``<bag>_values`` list<float32>.

Partition rows (``iter-k/<c>/partition/<split>/shard=<s>``): ``uid``, ``label``, ``weight``,
``offset`` (input offset + the latest scores of every other coordinate), ``indices`` and
``values`` (the coordinate's bag), for a random effect ``entity_id`` (string; a shard holds
whole entities, its rows in no particular order: the trainer groups them), and ``fixed_score`` (the fixed effect's latest score) when the step
also moves mass into the fixed effect. A per-entity coordinate's rows are grouped by entity
once, in its first pass; a later pass's partition holds only ``uid``, ``offset`` (and
``fixed_score``) per shard (``offsets_schema``), joined by uid onto the first pass's rows
by the trainer (its done marker names that pass: ``rows_iteration``).

Coefficients (``coefficients/<coordinate>``): one row per model, ``model_id`` string
(``global`` for the fixed effect), ``intercept`` float64, ``indices`` list<int32>
(ascending, the bag's feature index) and ``values`` list<float64>. A coordinate with
``variance: simple | full`` writes ``COEFFICIENTS_WITH_VARIANCES``: two more columns,
``intercept_variance`` float64 and ``variances`` list<float64> parallel to ``values``.
Tables without them (older runs, ``variance: none``) read with that schema as nulls.

Scores (``scores/<coordinate>/<split>``): ``uid`` int64, ``score`` float64: the
coordinate's own logit contribution.
"""
from __future__ import annotations

import pyarrow as pa

UID, LABEL, WEIGHT, OFFSET = "uid", "label", "weight", "offset"
ENTITY_ID, INDICES, VALUES, FIXED_SCORE, SCORE = "entity_id", "indices", "values", "fixed_score", "score"
MODEL_ID, INTERCEPT = "model_id", "intercept"
FIXED_EFFECT_MODEL_ID = "global"
INTERCEPT_NAME, INTERCEPT_TERM = "(INTERCEPT)", ""


def bag_indices(bag: str) -> str:
    return f"{bag}_indices"


def bag_values(bag: str) -> str:
    return f"{bag}_values"


SCORES = pa.schema([(UID, pa.int64()), (SCORE, pa.float64())])
# Spark read schemas (DDL): naming the columns spares Spark a job that reads the footers.
SCORES_DDL = f"{UID} long, {SCORE} double"
PREPARED_KEYS = f"{UID} long, {LABEL} double, {WEIGHT} double, {OFFSET} double"

COEFFICIENTS = pa.schema([
    (MODEL_ID, pa.string()),
    (INTERCEPT, pa.float64()),
    (INDICES, pa.list_(pa.int32())),
    (VALUES, pa.list_(pa.float64())),
])

INTERCEPT_VARIANCE, VARIANCES = "intercept_variance", "variances"
COEFFICIENTS_WITH_VARIANCES = pa.schema(list(COEFFICIENTS) + [
    (INTERCEPT_VARIANCE, pa.float64()),
    (VARIANCES, pa.list_(pa.float64())),
])

FEATURE_INDEX = pa.schema([("index", pa.int32()), ("name", pa.string()), ("term", pa.string())])

NTV = pa.list_(pa.struct([("name", pa.string()), ("term", pa.string()), ("value", pa.float64())]))
MODEL = pa.schema([(MODEL_ID, pa.string()), ("means", NTV), ("variances", NTV)])
# An exported model row kept from the prior (or warm-start) models because the entity had
# no model tonight (docs: README "Priors"): MODEL plus ``carried_over`` (bool).
CARRIED_OVER = "carried_over"
MODEL_WITH_CARRIED = pa.schema(list(MODEL) + [(CARRIED_OVER, pa.bool_())])


def partition_schema(random_effect: bool, with_fixed_score: bool) -> pa.Schema:
    fields = [(UID, pa.int64()), (LABEL, pa.float64()), (WEIGHT, pa.float64()), (OFFSET, pa.float64())]
    if random_effect:
        fields.append((ENTITY_ID, pa.string()))
    fields += [(INDICES, pa.list_(pa.int32())), (VALUES, pa.list_(pa.float32()))]
    if with_fixed_score:
        fields.append((FIXED_SCORE, pa.float64()))
    return pa.schema(fields)


# The partition done marker's key naming the pass whose partition holds a step's rows.
ROWS_ITERATION = "rows_iteration"


def offsets_schema(with_fixed_score: bool) -> pa.Schema:
    """A later pass's partition of rows grouped once: the new offsets by uid."""
    return pa.schema([(UID, pa.int64()), (OFFSET, pa.float64())]
                     + ([(FIXED_SCORE, pa.float64())] if with_fixed_score else []))
