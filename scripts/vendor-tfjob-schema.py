#!/usr/bin/env python3
"""Write the TFJob CRD's openAPIV3Schema (Training Operator release, descriptions dropped)
to tests/schemas/, with a header naming the source and the version.

    git -C <training-operator clone> show v1.8.1:manifests/base/crds/kubeflow.org_tfjobs.yaml \
        | scripts/vendor-tfjob-schema.py v1.8.1 > tests/schemas/tfjob-v1.8.1.openapi.yaml

Only ``description`` strings are removed (documentation, not validation); every other
keyword of the v1 version's schema is kept as released.
"""
import sys

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(argv):
    version = argv[1] if len(argv) > 1 else "unknown"
    crd = yaml.safe_load(sys.stdin)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strip(v1["schema"]["openAPIV3Schema"])
    sys.stdout.write(
        f"# The openAPIV3Schema of CustomResourceDefinition {crd['metadata']['name']}, version v1,\n"
        f"# from kubeflow/training-operator {version}, manifests/base/crds/kubeflow.org_tfjobs.yaml\n"
        "# (controller-gen output). Description strings removed, nothing else changed.\n"
        "# Regenerate with scripts/vendor-tfjob-schema.py.\n")
    yaml.safe_dump(schema, sys.stdout, sort_keys=True, default_flow_style=False, width=100)


if __name__ == "__main__":
    main(sys.argv)
