"""Render the config reference from src/gdmix/config_spec.py: the table in README.md
(between its config-reference markers) and docs/gdmix-config.schema.json.

    python scripts/config_reference.py           # rewrite both
    python scripts/config_reference.py --check   # exit 1 when either is stale
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's declarations, whatever is installed

from gdmix import config_reference as ref  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether the files are current")
    args = ap.parse_args(argv)
    readme, schema = ROOT / "README.md", ROOT / ref.SCHEMA_PATH
    wanted = {readme: ref.with_table(readme.read_text()), schema: ref.json_schema_text()}
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)}: stale; run python scripts/config_reference.py", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(wanted[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
