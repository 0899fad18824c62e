"""images/ and .dockerignore: dependencies in their own layer before the code, a small build
context, content tags that follow what goes into the images, a trainer without Java, and
the spark image's optional, checksummed GCS connector (its RUN step executed here with a
stand-in python3). No image is built here (no container daemon)."""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gdmix.kfp import images

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: a continuation line runs off the end"
    return out


def copy_sources(args: str) -> list[str]:
    parts = [p for p in args.split() if not p.startswith("--")]
    return parts[:-1]


def test_the_parser_reads_instructions():
    ins = instructions(IMAGES / "base" / "Dockerfile")
    assert ins[0][0] == "ARG" and ins[1] == ("FROM", "${BASE_IMAGE}")
    assert all(re.fullmatch(r"[A-Z]+", k) for k, _ in ins)
    assert copy_sources("--chown=1000:1000 a b /dst/") == ["a", "b"]


def test_base_installs_dependencies_in_their_own_layer_before_the_code():
    ins = instructions(IMAGES / "base" / "Dockerfile")
    copies = [(i, copy_sources(a)) for i, (k, a) in enumerate(ins) if k == "COPY"]
    runs = [(i, a) for i, (k, a) in enumerate(ins) if k == "RUN"]
    # 1. the first COPY brings only the files that name the dependencies
    first_copy, first_sources = copies[0]
    assert sorted(first_sources) == ["pyproject.toml", "requirements.lock"]
    # 2. then the dependencies are installed, pinned by the lock file, without the package
    deps = [(i, a) for i, a in runs if i > first_copy and "pip install" in a][0]
    assert "-c /opt/gdmix/deps/requirements.lock" in deps[1] and "--no-deps" not in deps[1]
    assert not any(i < deps[0] and "src" in srcs for i, srcs in copies), "no code before the dependencies"
    # 3. the code comes after, and its install does not touch the dependencies
    (code_copy,) = [i for i, srcs in copies if srcs == ["src"]]
    assert code_copy > deps[0]
    package = [(i, a) for i, a in runs if i > code_copy and "pip install" in a]
    assert package and "--no-deps" in package[0][1]
    # every COPY after the dependency layer is code or configs, nothing before it is
    assert {s for i, srcs in copies if i > deps[0] for s in srcs} <= {"pyproject.toml", "README.md", "src", "examples"}
    assert not any("pip install" in a for i, a in runs if i > package[0][0]), "no dependency install after the code"


def test_trainer_has_no_java_and_spark_has_it():
    trainer = " ".join(a for _, a in instructions(IMAGES / "trainer" / "Dockerfile"))
    spark = " ".join(a for _, a in instructions(IMAGES / "spark" / "Dockerfile"))
    assert not re.search(r"apt-get|jre|jdk|java", trainer, re.I)
    assert "default-jre-headless" in spark and "JAVA_HOME" in spark
    for name in ("trainer", "spark"):
        first = instructions(IMAGES / name / "Dockerfile")
        assert ("FROM", "${BASE_IMAGE}") in first  # both on the base: its dependency layer is shared


def test_every_image_runs_as_a_numeric_non_root_user():
    for name in ("base", "trainer", "spark"):
        users = [a for k, a in instructions(IMAGES / name / "Dockerfile") if k == "USER"]
        assert users and users[-1] == "1000", name


# ---- .dockerignore ---------------------------------------------------------------------------

def dockerignore() -> list[str]:
    return [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
            if l.strip() and not l.startswith("#")]


def test_dockerignore_keeps_the_build_context_small():
    entries = set(dockerignore())
    for needed in (".venv", "data", "runs", "build", ".git", "**/__pycache__", "**/*.pyc", ".pytest_cache"):
        assert needed in entries, needed
    assert not any(e.startswith("!") for e in entries)


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    copied = {s.rstrip("/") for name in ("base", "trainer", "spark")
              for k, a in instructions(IMAGES / name / "Dockerfile") if k == "COPY" for s in copy_sources(a)}
    assert copied == {"pyproject.toml", "requirements.lock", "README.md", "src", "examples", "manifests/spark"}
    for entry in dockerignore():
        for c in copied:
            assert entry.rstrip("/") != c and not c.startswith(entry.rstrip("/") + "/"), f"{entry} hides {c}"
    # and the content tag covers every file copied
    assert copied <= set(images.IMAGE_INPUTS)


# ---- content tags ----------------------------------------------------------------------------

def small_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "src" / "gdmix").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "images" / "base").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "gdmix"\nversion = "1.2.3"\n')
    (root / "requirements.lock").write_text("numpy==2.4.6\n")
    (root / "src" / "gdmix" / "a.py").write_text("x = 1\n")
    (root / "tests" / "test_a.py").write_text("def test(): pass\n")
    (root / "images" / "base" / "Dockerfile").write_text("FROM scratch\n")
    return root


def test_the_content_tag_changes_with_what_goes_into_the_images_only(tmp_path):
    root = small_tree(tmp_path)
    tag = images.content_tag(root)
    assert re.fullmatch(r"1\.2\.3-[0-9a-f]{12}", tag)
    assert images.content_tag(root) == tag  # deterministic
    (root / "tests" / "test_a.py").write_text("def test(): assert 0\n")  # not in any image
    (root / "src" / "gdmix" / "__pycache__").mkdir()
    (root / "src" / "gdmix" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")  # .dockerignore'd
    assert images.content_tag(root) == tag
    (root / "src" / "gdmix" / "a.py").write_text("x = 2\n")  # code
    code = images.content_tag(root)
    assert code != tag
    (root / "requirements.lock").write_text("numpy==2.4.7\n")  # a dependency
    deps = images.content_tag(root)
    assert deps != code
    (root / "images" / "base" / "Dockerfile").write_text("FROM scratch\nUSER 1000\n")  # the recipe
    recipe = images.content_tag(root)
    assert recipe != deps
    (root / "src" / "gdmix" / "b.py").write_text("")  # a new file, even empty
    assert images.content_tag(root) != recipe
    # build arguments that change the images change the tag; empty ones are the defaults
    base = images.content_tag(root)
    assert images.content_tag(root, {"GCS_CONNECTOR_VERSION": ""}) == base
    assert images.content_tag(root, {"GCS_CONNECTOR_VERSION": "3.0.4"}) != base


def test_the_repository_tag_covers_the_image_inputs():
    files = {p.as_posix() for p in images.image_files(ROOT)}
    assert "pyproject.toml" in files and "requirements.lock" in files and "images/base/Dockerfile" in files
    assert "src/gdmix/kfp/tfjob.py" in files and any(f.startswith("examples/") for f in files)
    assert "manifests/spark/executor-pod-template.yaml" in files  # the Spark image copies it
    assert not any(f.startswith(("tests/", "pipelines/", "manifests/gdmix/")) or "__pycache__" in f for f in files)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_computes_the_same_content_tag_as_python():
    def make(*args):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "IMAGE_TAG", "GCS_", "BASE_IMAGE"))}
        return subprocess.run(["make", "-s", "--no-print-directory", "image-tag", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip()

    default_base = re.search(r"^BASE_IMAGE\s*\?=\s*(\S+)", (ROOT / "mk" / "kfp.mk").read_text(), re.M).group(1)
    assert make() == images.content_tag(ROOT, {"BASE_IMAGE": default_base})
    assert make("GCS_CONNECTOR_VERSION=3.0.4") == images.content_tag(
        ROOT, {"BASE_IMAGE": default_base, "GCS_CONNECTOR_VERSION": "3.0.4"})
    assert make("IMAGE_TAG=pinned") == "pinned"  # an explicit tag still wins


# ---- the spark image's GCS connector step, run here ------------------------------------------

def gcs_step() -> str:
    (run,) = [a for k, a in instructions(IMAGES / "spark" / "Dockerfile") if k == "RUN" and "GCS_CONNECTOR" in a]
    return run


def test_the_gcs_connector_is_off_by_default_and_pinned_by_checksum():
    ins = instructions(IMAGES / "spark" / "Dockerfile")
    args = dict(a.partition("=")[::2] for k, a in ins if k == "ARG")
    assert args["GCS_CONNECTOR_VERSION"] == "" and args["GCS_CONNECTOR_SHA256"] == ""
    assert "sha256sum -c" in gcs_step()


@pytest.fixture
def sandbox(tmp_path):
    """A stand-in python3 on PATH: prints a pyspark jars folder, and 'downloads' by copying
    the file FAKE_JAR (the real step's two uses of python3)."""
    bin_dir, jars = tmp_path / "bin", tmp_path / "site" / "pyspark" / "jars"
    bin_dir.mkdir()
    jars.mkdir(parents=True)
    jar = tmp_path / "connector.jar"
    jar.write_bytes(b"PK\x03\x04 not really a jar")
    stub = bin_dir / "python3"
    stub.write_text('#!/bin/sh\ncase "$2" in\n'
                    f'  *pyspark*) echo "{jars}" ;;\n'
                    '  *urlretrieve*) echo "$3" > "$FAKE_JAR.url"; cp "$FAKE_JAR" "$4" ;;\n'
                    '  *) exit 97 ;;\nesac\n')
    stub.chmod(0o755)
    return {"bin": bin_dir, "jars": jars, "jar": jar, "sha": hashlib.sha256(jar.read_bytes()).hexdigest(),
            "tmp": tmp_path}


def run_gcs_step(sandbox, **args):
    env = {"PATH": f"{sandbox['bin']}:/usr/bin:/bin", "FAKE_JAR": str(sandbox["jar"]),
           "GCS_CONNECTOR_VERSION": "", "GCS_CONNECTOR_SHA256": "", "GCS_CONNECTOR_URL": "", **args}
    # the step writes /tmp/gcs-connector.jar: run it with /tmp mapped to the sandbox
    script = gcs_step().replace("/tmp/", f"{sandbox['tmp']}/")
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_gcs_step_without_a_version_installs_nothing(sandbox):
    r = run_gcs_step(sandbox)
    assert r.returncode == 0 and "no GCS connector" in r.stdout
    assert list(sandbox["jars"].iterdir()) == []


def test_gcs_step_refuses_a_version_without_a_checksum(sandbox):
    r = run_gcs_step(sandbox, GCS_CONNECTOR_VERSION="3.0.4")
    assert r.returncode != 0 and "GCS_CONNECTOR_SHA256" in r.stderr
    r = run_gcs_step(sandbox, GCS_CONNECTOR_VERSION="3.0.4", GCS_CONNECTOR_SHA256="abc")
    assert r.returncode != 0
    assert list(sandbox["jars"].iterdir()) == []


def test_gcs_step_fails_on_a_checksum_mismatch(sandbox):
    r = run_gcs_step(sandbox, GCS_CONNECTOR_VERSION="3.0.4", GCS_CONNECTOR_SHA256="0" * 64)
    assert r.returncode != 0 and "FAILED" in (r.stdout + r.stderr)
    assert list(sandbox["jars"].iterdir()) == []


def test_gcs_step_installs_the_verified_jar_and_the_filesystem_settings(sandbox):
    r = run_gcs_step(sandbox, GCS_CONNECTOR_VERSION="3.0.4", GCS_CONNECTOR_SHA256=sandbox["sha"])
    assert r.returncode == 0, r.stderr
    installed = sandbox["jars"] / "gcs-connector-3.0.4-shaded.jar"
    assert installed.read_bytes() == sandbox["jar"].read_bytes()
    url = Path(str(sandbox["jar"]) + ".url").read_text().strip()
    assert url == ("https://repo1.maven.org/maven2/com/google/cloud/bigdataoss/gcs-connector/3.0.4/"
                   "gcs-connector-3.0.4-shaded.jar")
    conf = (sandbox["jars"].parent / "conf" / "spark-defaults.conf").read_text()
    assert "spark.hadoop.fs.gs.impl com.google.cloud.hadoop.fs.gcs.GoogleHadoopFileSystem" in conf
    # an explicit URL (a mirror) is used as given
    r = run_gcs_step(sandbox, GCS_CONNECTOR_VERSION="3.0.4", GCS_CONNECTOR_SHA256=sandbox["sha"],
                     GCS_CONNECTOR_URL="https://mirror.example/gcs.jar")
    assert r.returncode == 0 and Path(str(sandbox["jar"]) + ".url").read_text().strip() == "https://mirror.example/gcs.jar"
