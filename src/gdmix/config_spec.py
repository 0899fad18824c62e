"""Every key of the run config, declared once: name, type, default, allowed values, meaning.

``gdmix.config`` reads a config by these declarations (a key not declared here is an
error), and ``gdmix.config_reference`` renders the README's config table and the JSON
Schema for editors from them, so the three cannot disagree.

To add a key: one ``Key(...)`` in the tuple of its section (``TOP``, ``DATA``,
``COORDINATE``, ``FIXED_EFFECT``, ``RANDOM_EFFECT``, ``SPARK``...), then read it in
``gdmix.config.parse`` with ``section.get(name)``; ``scripts/config_reference.py``
re-renders the table and the schema. A new kind of value is one more ``Type``
(``gdmix.config_keys``).
"""
from __future__ import annotations

import re

from gdmix.config_keys import (BOOL, FLOAT, INT, INT_LIST, NAME, NAMED_SECTIONS, OPTIONAL_FLOAT, OPTIONAL_INT,
                               OPTIONAL_SECTION, OPTIONAL_STR, QUANTITY_STR, SECTION, SECTION_LIST, STR, STR_LIST,
                               STRING_MAP, ConfigError, Key, Type, coerce)
from gdmix.metric_names import DEFAULT_METRICS, KNOWN_METRICS

FIXED_EFFECT = "fixed_effect"
RANDOM_EFFECT = "random_effect"
COORDINATE_TYPES = (FIXED_EFFECT, RANDOM_EFFECT)
HESSIAN_SETTINGS = ("auto", "matrix", "products")  # the linear fixed effect's Newton solver
VARIANCE_SETTINGS = ("none", "simple", "full")  # coefficient variances: 1/diag(H) or diag(H⁻¹)
L2_AUTO = ("coordinate", "per_feature")  # l2: auto: one λ per coordinate, or per feature + intercept (gdmix.l2)
TASKS = ("logistic", "linear", "poisson")  # ``task:``: the loss of every solver (gdmix.losses)
ACCELERATIONS = ("newton", "none")  # ``acceleration:``: the joint Newton step after each pass, or none
# The kinds a coordinate selects (``gdmix.kinds`` holds them; a test keeps these equal).
MODELS = ("linear", "dnn", "external")
SOLVERS = ("vectorised", "scipy", "data_parallel", "auto")

MASTER = re.compile(r"local(\[(\*|\d+)(,\s*\d+)?\])?|local-cluster\[[\d,\s]+\]|(spark|k8s|mesos)://\S+|yarn")
JVM_MEMORY = re.compile(r"\d+[kKmMgGtT]?")


def _matching(regex: re.Pattern, what: str):
    def read(value, path):
        value = coerce(value, str, path)
        if not regex.fullmatch(value):
            raise ConfigError(f"{path}: expected {what}, got {value!r}")
        return value
    return read


# ``l2``: a number, a grid (``gdmix.grid``) or auto (``gdmix.l2``); its forms and bounds are
# checked by ``gdmix.config._l2``, which names the offending item.
L2 = Type("number, list of numbers (a grid) or auto", {"oneOf": [
    {"type": "number", "minimum": 0},
    {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"type": "number", "exclusiveMinimum": 0}},
    {"const": "auto"},
    {"type": "object", "required": ["auto"], "additionalProperties": False,
     "properties": {"auto": {"enum": list(L2_AUTO)}, "initial": {"type": "number", "exclusiveMinimum": 0}}}]},
    lambda value, path: value)
SPARK_MASTER = Type("Spark master URL", {"type": "string", "pattern": f"^({MASTER.pattern})$"},
                    _matching(MASTER, "local, local[N], local[*], spark://..., k8s://... or yarn"))
JVM_SIZE = Type("JVM memory size", {"type": "string", "pattern": f"^{JVM_MEMORY.pattern}$"},
                _matching(JVM_MEMORY, "a JVM memory size such as 4g or 512m"))
# Checked in full against the coordinates by ``gdmix.metric_names.parse_metrics``.
METRICS = Type("list of metric names", {"type": "array", "items": {
    "type": "string", "pattern": f"^({'|'.join(KNOWN_METRICS)}|auc@.+|precision@[0-9]+@.+)$"}},
    lambda value, path: value)

COLUMNS = (
    Key("uid", STR, "Row id column (int64, unique, no nulls): joins scores across stages.", "uid"),
    Key("label", STR, "Label column: 0 or 1.", "label"),
    Key("weight", OPTIONAL_STR, "Row weight column, used when the data has it (else weight 1); "
        "another name must exist; null: never read.", "weight"),
    Key("offset", OPTIONAL_STR, "Offset column added to every row's score, used when the data has it "
        "(else 0); another name must exist; null: never read.", "offset"),
)

FEATURE_BAG = (
    Key("columns", STR_LIST, "Plain numeric columns: each is a feature named by its column (term \"\"); "
        "a null value means the feature is absent in that row. Give this or `ntv`.", None),
    Key("ntv", STR, "A `list<struct<name, term, value>>` column holding the row's features. "
        "Give this or `columns`.", None),
)

DATA = (
    Key("train", STR, "Training rows: a Parquet file, folder or glob, local or any fsspec URL; "
        "relative to the config file's folder."),
    Key("validation", OPTIONAL_STR, "Validation rows, as `train`; null: a seeded split of `train`.", None),
    Key("validation_fraction", FLOAT, "Share of `train` held out for validation when `validation` is null.",
        0.2, above=0, below=1),
    Key("split_seed", INT, "Seed of that split, and of the hashed row sample of `max_samples`.", 0),
    Key("columns", OPTIONAL_SECTION, "Which input columns hold the uid, label, weight and offset.", None,
        keys=COLUMNS),
    Key("feature_bags", NAMED_SECTIONS, "Named sets of features; each coordinate reads one. A bag's name "
        "uses letters, digits, `-` and `_`.", keys=FEATURE_BAG),
)

DNN = (
    Key("hidden_units", INT_LIST, "Widths of the dense layers over the global bag.", (32,)),
    Key("text", OPTIONAL_STR, "A string input column read by a text tower (tokenised by prepare); "
        "null: no text tower.", None),
    Key("text_max_tokens", INT, "Tokens kept per row (truncated or padded).", 16, minimum=1),
    Key("text_embedding_dim", INT, "Width of the text tower's word embedding.", 16, minimum=1),
    Key("vocab_min_count", INT, "Words seen fewer times in train map to the out-of-vocabulary token.", 2,
        minimum=1),
    Key("vocab_max_size", INT, "Most words in the vocabulary.", 20_000, minimum=1),
    Key("learning_rate", FLOAT, "AdamW's learning rate.", 0.003, above=0),
    Key("weight_decay", FLOAT, "AdamW's decoupled weight decay (not part of the reported objective).",
        0.0001, minimum=0),
    Key("batch_size", INT, "Global mini-batch size, split over the workers.", 512, minimum=1),
    Key("epochs", INT, "Most epochs per coordinate-descent step.", 20, minimum=1),
    Key("patience", INT, "Epochs without a better validation AUC before stopping.", 2, minimum=1),
    Key("seed", INT, "Seed of the initial weights and the batch order.", 0, minimum=0),
)

# Keys of every coordinate, then those of each type.
COORDINATE = (
    Key("name", NAME, "The coordinate's name (letters, digits, `-`, `_`): its folders and score columns."),
    Key("type", STR, "`fixed_effect` (one global model) or `random_effect` (a model per entity).",
        choices=COORDINATE_TYPES),
    Key("feature_bag", STR, "The feature bag (under `data.feature_bags`) the coordinate reads."),
    Key("l2", L2, "L2 penalty weight λ: the objective adds λ/2 ‖coefficients‖². A list `[λ, ...]`: a grid "
        "the embedded driver searches by the validation metric (`select`, else AUC), one coordinate at a "
        "time; random effects: `auto` (one λ) or `{auto: per_feature, initial: λ0}` (intercept and each "
        "feature apart) estimates λ from the data (docs/design.md §7).", 1.0),
    Key("tolerance", FLOAT, "Solver stops when the projected gradient is below this, relative to the data.",
        1e-10, above=0),
    Key("max_iterations", INT, "Most solver iterations per coordinate-descent step.", 1000, above=0),
    Key("variance", STR, "Coefficient variances written with the models: `simple` 1/diag(H), "
        "`full` diag(H⁻¹).", "none", choices=VARIANCE_SETTINGS),
    Key("cpu", QUANTITY_STR, "On a cluster: CPU request of each TF worker pod (e.g. \"2\", \"500m\").", None),
    Key("memory", QUANTITY_STR, "On a cluster: memory request and limit of each TF worker pod "
        "(e.g. \"2Gi\").", None),
)
FIXED_EFFECT_KEYS = (
    Key("model", STR, "`linear` (logistic regression on TF workers), `dnn` (a Keras model, settings "
        "under `dnn`) or `external` (scores given in `external_scores`).", "linear", choices=MODELS),
    Key("regularize_intercept", BOOL, "Whether the penalty covers the intercept.", False),
    Key("workers", INT, "TF worker processes (TFJob replicas on a cluster).", 1, above=0),
    Key("hessian", STR, "Linear model's Newton solver: all-reduce the Hessian `matrix`, or Hessian-vector "
        "`products`; `auto`: the matrix up to 1,024 features when it is cheaper.", "auto",
        choices=HESSIAN_SETTINGS),
    Key("external_scores", OPTIONAL_STR, "`model: external`: an input column, or a Parquet of "
        "(uid, score), holding the fixed effect's scores.", None),
    Key("dnn", SECTION, "`model: dnn`: the deep model's settings.", {}, keys=DNN),
)
RANDOM_EFFECT_KEYS = (
    Key("entity", STR, "The entity id column (int64 or string): one model per value."),
    Key("solver", STR, "`vectorised` (compiled per-entity Newton), `scipy` (per-entity L-BFGS reference), "
        "`data_parallel` (few large entities, on TF workers) or `auto` (chosen from the data).",
        "vectorised", choices=SOLVERS),
    Key("regularize_intercept", BOOL, "Whether the penalty covers each entity's intercept.", True),
    Key("min_samples", INT, "Entities with fewer training rows get no model (scored 0 by this coordinate).",
        1, above=0),
    Key("max_samples", OPTIONAL_INT, "An entity with more training rows trains on a hashed sample of "
        "this many; null: all rows.", None, above=0),
    Key("shards", INT, "Entity shards: parallel pods on a cluster.", 1, above=0),
)

SPARK = (
    Key("master", SPARK_MASTER, "Spark master: `local[*]`, `local[N]`, `k8s://...`, `spark://...`, `yarn`.",
        "local[*]"),
    Key("driver_memory", JVM_SIZE, "Spark driver's memory.", "4g"),
    Key("executors", INT, "A cluster master's executors; 0: the cluster manager decides.", 0, minimum=0),
    Key("executor_cores", INT, "Cores per executor (cluster master).", 1, above=0),
    Key("executor_memory", JVM_SIZE, "Memory per executor (cluster master).", "4g"),
    Key("conf", STRING_MAP, "Further Spark settings, `spark.*` name to value.", {}),
)

TIMEOUTS = (
    Key("fixed_effect_seconds", FLOAT, "Longest a fixed-effect step's TF workers may take.", 3600.0, above=0),
    Key("worker_exit_seconds", FLOAT, "Grace period for TF workers to exit after the final barrier.", 30.0,
        above=0),
    Key("metrics_seconds", FLOAT, "Longest the embedded driver waits for a step's metrics.", 3600.0, above=0),
)

SELECT = (
    Key("metric", STR, "One of `metrics`: finalize exports the models of the step best on it."),
)

PUBLISH = (
    Key("to", STR, "Folder URL: `versions/<version>/` and `latest.json` go under it."),
    Key("min_auc", OPTIONAL_FLOAT, "Refuse a candidate whose validation AUC is lower.", None, above=0, below=1),
    Key("max_auc_drop", OPTIONAL_FLOAT, "Refuse one whose AUC is more than this below the current latest.",
        None, minimum=0),
)

PRIOR = (
    Key("models", STR, "A published model folder (a run's `models/`) trained with `variance`: its means and "
        "variances become each matched coefficient's prior."),
    Key("weight", FLOAT, "w in the prior penalty (w/2)(θ − μ)²/σ².", 1.0, minimum=0),
)

TOP = (
    Key("name", STR, "The run's name (pipeline and report titles)."),
    Key("workdir", STR, "Work directory: a local path or any fsspec URL (`gs://bucket/runs/x`); "
        "relative to the current directory."),
    Key("data", SECTION, "The input data: files, columns and feature bags.", keys=DATA),
    Key("iterations", INT, "Coordinate-descent passes over all coordinates.", 1, above=0),
    Key("acceleration", STR, "`newton`: each pass ends with one joint Newton step over the convex coordinates "
        "(conjugate gradients preconditioned by each coordinate's own block, an exact line search; never "
        "raises the objective), step `iter-<k>/_joint`, when at least two can move; `none`: plain block "
        "descent.", "newton", choices=ACCELERATIONS),
    Key("coordinates", SECTION_LIST, "The model's coordinates, in update order: at most one fixed effect "
        "and any number of random effects.", keys=COORDINATE),
    Key("task", STR, "The response and its loss: `logistic` (0/1 labels), `linear` (real labels, squared "
        "error), `poisson` (counts ≥ 0, log link).", "logistic", choices=TASKS),
    Key("metrics", METRICS, "Validation metrics recorded for each step: `auc`, `logloss`, `aupr`, `rmse`, "
        "`poisson_deviance`, `auc@<entity column>`, `precision@<k>@<entity column>`. Default: "
        "[auc, logloss] for logistic, [rmse] for linear, [rmse, poisson_deviance] for poisson.",
        list(DEFAULT_METRICS)),
    Key("select", OPTIONAL_SECTION, "Export the step best on a metric instead of the last.", None, keys=SELECT),
    Key("parallelism", INT, "Processes for random effects; 0: all cores.", 0, minimum=0),
    Key("spark", OPTIONAL_SECTION, "The Spark session of prepare, partition and metrics.", None, keys=SPARK),
    Key("timeouts", OPTIONAL_SECTION, "Bounds on waits, so nothing hangs.", None, keys=TIMEOUTS),
    Key("publish", OPTIONAL_SECTION, "Where `gdmix publish` copies a finished run, and its gates.", None,
        keys=PUBLISH),
    Key("warm_start", OPTIONAL_STR, "A published model folder: the first steps start from its models.", None),
    Key("prior", OPTIONAL_SECTION, "Last run's models as the prior of this one.", None, keys=PRIOR),
)

# A coordinate's keys by its type (every coordinate's, then its type's own).
BY_TYPE = {FIXED_EFFECT: COORDINATE + FIXED_EFFECT_KEYS, RANDOM_EFFECT: COORDINATE + RANDOM_EFFECT_KEYS}
