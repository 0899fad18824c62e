"""Kubeflow Pipelines glue: image names, the fixed-effect TFJob launcher, submit/schedule.

Nothing here is needed by the embedded run (``gdmix run``); the pipeline in
``pipelines/`` and the components in ``components/`` use these helpers at compile time,
and the fixed-effect stage uses ``tfjob.select`` to pick its worker launcher.
"""
