"""Kubeflow Pipelines glue: image names, the TFJob launcher (``tfjob``, with its pods and
settings), a run's work directory (``runs``), submit/schedule.

Nothing here is needed by the embedded run (``gdmix run``); the pipeline in
``pipelines/`` and the components in ``components/`` use these helpers, and the CLI picks
the TF-worker launcher it hands down to training with ``tfjob.select``.
"""
