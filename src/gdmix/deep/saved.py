"""Where a trained deep model lives and how it is read back.

    iter-<k>/<c>/model/model.keras     the Keras model (built-in layers only)
    iter-<k>/<c>/model/meta.json       bag width, settings, the vocabulary's words
    iter-<k>/<c>/checkpoints/          tf.train.Checkpoint of the best epoch (restorable)
    models/<c>/                        a copy of model/ at export (``gdmix score`` reads it)

Keeping the vocabulary inside the model folder makes the folder self-contained: scoring
needs it and the bag's feature index, nothing from training.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from gdmix import layout, storage
from gdmix.deep.settings import DnnSettings

MODEL_FILE, META_FILE = "model.keras", "meta.json"


def step_model_dir(workdir: str, iteration: int, coordinate: str) -> str:
    return storage.join(layout.step_dir(workdir, iteration, coordinate), "model")


def checkpoint_dir(workdir: str, iteration: int, coordinate: str) -> str:
    return storage.join(layout.step_dir(workdir, iteration, coordinate), "checkpoints")


def save(model, url: str, n_features: int, settings: DnnSettings, words: list[str] | None) -> None:
    """Write model.keras and meta.json into folder ``url`` (committed atomically)."""
    with storage.atomic_path(url) as tmp, tempfile.TemporaryDirectory() as local:
        storage.makedirs(tmp)
        path = os.path.join(local, MODEL_FILE)
        model.save(path)
        with open(path, "rb") as f, storage.open_file(storage.join(tmp, MODEL_FILE), "wb") as out:
            out.write(f.read())
        storage.write_json(storage.join(tmp, META_FILE), {"n_features": n_features, "settings": dataclasses.asdict(settings),
                                                "words": words})


def load(url: str):
    """(Keras model, meta) from a folder written by ``save``."""
    import keras

    meta = storage.read_json(storage.join(url, META_FILE))
    with tempfile.TemporaryDirectory() as local:
        path = os.path.join(local, MODEL_FILE)
        with storage.open_file(storage.join(url, MODEL_FILE), "rb") as f, open(path, "wb") as out:
            out.write(f.read())
        model = keras.saving.load_model(path, compile=False)
    return model, meta


def copy(src: str, dst: str) -> None:
    with storage.atomic_path(dst) as tmp:
        storage.makedirs(tmp)
        for name in (MODEL_FILE, META_FILE):
            with storage.open_file(storage.join(src, name), "rb") as f, storage.open_file(storage.join(tmp, name), "wb") as out:
                out.write(f.read())


def predict(model, inputs: list, batch_size: int = 8192) -> np.ndarray:
    """The model's logits (float64) for input arrays, in fixed-size batches."""
    n = len(inputs[0])
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        part = [a[start:start + batch_size] for a in inputs]
        out[start:start + batch_size] = np.asarray(model(part, training=False))[:, 0]
    return out
