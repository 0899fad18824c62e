"""The project's container image names, configurable at compile time.

    <registry>/gdmix-<kind>:<tag>     kind: base | trainer | spark

``GDMIX_REGISTRY`` (default ``localhost``, what ``buildah``/``podman`` name local images
and ``kind load`` accepts) and ``GDMIX_IMAGE_TAG`` (default: the package version) override
the defaults; explicit arguments override both.

Content tags: ``content_tag`` is ``<version>-<12 hex digits>``, a SHA-256 over every file
that goes into the images (``IMAGE_INPUTS``, less what ``.dockerignore`` leaves out) and the
build arguments that change them. ``make images`` tags the images with it and compiles the
pipeline it runs with it (mk/kfp.mk computes it by running this file as a script:
``python3 src/gdmix/kfp/images.py tag [--build-arg K=V ...]``), so a node never runs a stale
image under an unchanged tag with ``imagePullPolicy: IfNotPresent``. Standard library only:
the script runs before any virtual environment exists.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

KINDS = ("base", "trainer", "spark")
DEFAULT_REGISTRY = "localhost"

# What the Dockerfiles under images/ copy from the build context (the repository root), and
# the Dockerfiles themselves.
IMAGE_INPUTS = ("pyproject.toml", "requirements.lock", "README.md", "src", "examples", "manifests/spark", "images")
# Never in an image (.dockerignore): caches and build leftovers.
_IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "rootfs"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".tar", ".tar.gz")
HASH_LENGTH = 12


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


def _ignored(rel: Path) -> bool:
    return (any(p in _IGNORED_PARTS or p.endswith(".egg-info") for p in rel.parts)
            or rel.name.endswith(_IGNORED_SUFFIXES))


def image_files(root: str | Path) -> list[Path]:
    """The files that go into the images, relative to ``root``, sorted."""
    root = Path(root)
    out = []
    for name in IMAGE_INPUTS:
        path = root / name
        if path.is_file():
            out.append(Path(name))
        elif path.is_dir():
            out.extend(p.relative_to(root) for p in path.rglob("*") if p.is_file())
    return sorted(p for p in out if not _ignored(p))


def content_hash(root: str | Path, build_args: dict | None = None) -> str:
    """SHA-256 (hex) over the image files' paths and bytes and the non-empty build arguments."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in image_files(root):
        h.update(rel.as_posix().encode() + b"\0")
        h.update(hashlib.sha256((root / rel).read_bytes()).hexdigest().encode() + b"\n")
    for k, v in sorted((build_args or {}).items()):
        if v != "":  # an empty build argument is the Dockerfile's default: same image
            h.update(f"arg {k}={v}\n".encode())
    return h.hexdigest()


def project_version(root: str | Path) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (Path(root) / "pyproject.toml").read_text(), re.M)
    if not m:
        raise ValueError(f"no version in {Path(root) / 'pyproject.toml'}")
    return m.group(1)


def content_tag(root: str | Path, build_args: dict | None = None) -> str:
    """``<version>-<hash>``: changes whenever what goes into the images changes."""
    return f"{project_version(root)}-{content_hash(root, build_args)[:HASH_LENGTH]}"


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="images.py", description="print the images' content tag")
    ap.add_argument("command", choices=["tag"])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[3]))
    ap.add_argument("--build-arg", action="append", default=[], metavar="K=V",
                    help="a build argument that changes the images (repeatable)")
    args = ap.parse_args(argv)
    build_args = dict(a.split("=", 1) for a in args.build_arg)
    print(content_tag(args.root, build_args))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
