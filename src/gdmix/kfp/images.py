"""The project's container image names, configurable at compile time.

    <registry>/gdmix-<kind>:<tag>     kind: base | trainer | spark

``GDMIX_REGISTRY`` (default ``localhost``, what ``buildah``/``podman`` name local images
and ``kind load`` accepts) and ``GDMIX_IMAGE_TAG`` (default: the package version) override
the defaults; explicit arguments override both.
"""
from __future__ import annotations

import os

KINDS = ("base", "trainer", "spark")
DEFAULT_REGISTRY = "localhost"


def default_tag() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gdmix")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "dev"


def image(kind: str, registry: str | None = None, tag: str | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r} (known: {KINDS})")
    registry = (registry or os.environ.get("GDMIX_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")
    tag = tag or os.environ.get("GDMIX_IMAGE_TAG") or default_tag()
    return f"{registry}/gdmix-{kind}:{tag}"
