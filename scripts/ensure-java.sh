#!/usr/bin/env bash
# Spark needs a Java runtime (17 or 21). Install Debian's headless JRE where none is found.
set -euo pipefail
if command -v java >/dev/null 2>&1; then exit 0; fi
echo "no java found: installing a headless JRE (Spark needs one)" >&2
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq openjdk-17-jre-headless || $SUDO apt-get install -y -qq default-jre-headless
java -version
