"""The deep fixed effect's Keras model and the arrays it reads.

Inputs: ``bag`` (the global feature bag densified, float32, width d) and, with a text
tower, ``tokens`` (int32 ids, padded with 0 to ``text_max_tokens``). The bag goes through
dense ReLU layers; the tokens through an embedding mean-pooled over the non-padding
positions (a masked average), concatenated before the last hidden layers; one logit out.
Built-in layers only, so the saved ``.keras`` file loads with no custom objects.
"""
from __future__ import annotations

import numpy as np

from gdmix import sparse
from gdmix.deep.settings import DnnSettings
from gdmix.deep.text import OOV

BAG, TOKENS = "bag", "tokens"


def build(n_features: int, settings: DnnSettings, vocab_size: int | None):
    import keras

    bag = keras.Input(shape=(n_features,), dtype="float32", name=BAG)
    inputs, parts = [bag], [bag]
    if settings.text:
        tokens = keras.Input(shape=(settings.text_max_tokens,), dtype="int32", name=TOKENS)
        emb = keras.layers.Embedding(vocab_size, settings.text_embedding_dim, mask_zero=True, name="token_embedding")
        pooled = keras.layers.GlobalAveragePooling1D(name="text_mean")(emb(tokens))
        inputs.append(tokens)
        parts.append(pooled)
    h = parts[0] if len(parts) == 1 else keras.layers.Concatenate(name="features")(parts)
    for i, units in enumerate(settings.hidden_units):
        h = keras.layers.Dense(units, activation="relu", name=f"hidden_{i}")(h)
    logit = keras.layers.Dense(1, name="logit")(h)
    return keras.Model(inputs=inputs, outputs=logit, name="deep_fixed_effect")


def dense_bag(x: sparse.CSR, n_features: int) -> np.ndarray:
    """CSR rows → a dense float32 matrix (the bag's width is checked by the caller)."""
    out = np.zeros((x.n_rows, n_features), dtype=np.float32)
    out[x.row_ids(), x.indices] = x.values
    return out


def padded_tokens(lists: list, max_tokens: int) -> np.ndarray:
    """Token id lists → int32 [rows, max_tokens], truncated, padded with 0. An empty text
    reads as one out-of-vocabulary token: the masked mean of no positions would be 0/0."""
    out = np.zeros((len(lists), max_tokens), dtype=np.int32)
    for i, ids in enumerate(lists):
        ids = list(ids or [])[:max_tokens] or [OOV]
        out[i, :len(ids)] = ids
    return out


def inputs(bag: np.ndarray, tokens: np.ndarray | None) -> list:
    return [bag] if tokens is None else [bag, tokens]
