"""The deep fixed effect (``model: dnn``): a Keras model over the global feature bag plus
an optional text tower, trained by TF workers under MultiWorkerMirroredStrategy.

    settings  the coordinate's ``dnn`` mapping, validated
    text      tokeniser and vocabulary (built by prepare from train)
    model     the Keras model and its input arrays
    saved     where the trained model lives, loading it, scoring arrays with it
    worker    the training worker (``python -m gdmix.deep.worker``)
    scoring   scoring new raw rows for ``gdmix score``
"""
