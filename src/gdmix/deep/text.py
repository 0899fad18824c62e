"""The text tower's tokeniser and vocabulary.

Tokens are lower-cased runs of letters and digits. The vocabulary is built from the
train split only (so validation never leaks into it) and saved in the work directory as
``prepared/vocab/<coordinate>.json``; ids: 0 = padding, 1 = out of vocabulary, then
words by descending train count (ties by the word), each seen at least ``min_count`` times.
Prepare writes each row's ids as ``<column>_tokens list<int32>``; scoring new rows reuses
the saved vocabulary through the same Spark expression.
"""
from __future__ import annotations

from gdmix import layout, storage

PAD, OOV = 0, 1
TOKEN_PATTERN = r"[^a-z0-9]+"  # separators, after lower-casing


def tokens_column(column: str) -> str:
    return f"{column}_tokens"


def vocab_url(workdir: str, coordinate: str) -> str:
    return storage.join(layout.prepared_root(workdir), "vocab", f"{coordinate}.json")


def _words(column: str):
    from pyspark.sql import functions as F

    from gdmix.checks import col

    words = F.split(F.lower(F.coalesce(col(column).cast("string"), F.lit(""))), TOKEN_PATTERN)
    return F.array_remove(words, "")


def build_vocab(train_df, column: str, min_count: int, max_size: int) -> list[str]:
    """Words of ``column`` in the train rows, most frequent first (index i -> id i + 2)."""
    from pyspark.sql import functions as F

    counts = (train_df.select(F.explode(_words(column)).alias("w")).groupBy("w").count()
              .where(F.col("count") >= min_count).collect())
    ranked = sorted(((-r["count"], r["w"]) for r in counts))
    return [w for _, w in ranked[:max_size]]


def save_vocab(url: str, column: str, words: list[str]) -> None:
    storage.write_json(url, {"column": column, "pad": PAD, "oov": OOV, "words": words})


def load_vocab(url: str) -> dict:
    return storage.read_json(url)


def vocab_size(vocab: dict) -> int:
    return len(vocab["words"]) + 2


def token_ids(column: str, words: list[str]):
    """Spark column: the row's token ids (list<int>); unknown words -> OOV."""
    from pyspark.sql import functions as F

    mapping = F.create_map(*[x for i, w in enumerate(words) for x in (F.lit(w), F.lit(i + 2))]) if words else None
    ids = F.transform(_words(column), lambda w: F.coalesce(mapping[w], F.lit(OOV)) if mapping is not None
                      else F.lit(OOV))
    return ids.cast("array<int>")


def tokenise(text: str | None, words: list[str]) -> list[int]:
    """The same mapping in plain Python (tests, small inputs)."""
    import re

    index = {w: i + 2 for i, w in enumerate(words)}
    return [index.get(t, OOV) for t in re.split(TOKEN_PATTERN, (text or "").lower()) if t]
