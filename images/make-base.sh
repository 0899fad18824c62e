#!/usr/bin/env bash
# A local Debian bookworm base image for `make images`, made with debootstrap: for machines
# that reach Debian's package mirrors and PyPI but no container registry (so the default
# docker.io/library/python:3.11-slim-bookworm cannot be pulled). Needs root, debootstrap and
# buildah (apt-get install debootstrap buildah).
#   images/make-base.sh [IMAGE]          default IMAGE: localhost/debian-base:bookworm
# Then: make images BASE_IMAGE=localhost/debian-base:bookworm
# Env: MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm),
#      WORKDIR (the scratch rootfs folder, default build/debian-rootfs; removed afterwards),
#      EXTRA_CA_DIR (default /usr/local/share/ca-certificates, the host's locally added CAs:
#      copied in and trusted, so pip and apt work behind a TLS-inspecting proxy the host
#      trusts; EXTRA_CA_DIR= to skip).
set -euo pipefail

IMAGE=${1:-localhost/debian-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
WORKDIR=${WORKDIR:-build/debian-rootfs}
EXTRA_CA_DIR=${EXTRA_CA_DIR-/usr/local/share/ca-certificates}

for tool in debootstrap buildah; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$0: '$tool' not found (apt-get install $tool)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "$0: debootstrap needs root" >&2; exit 1; }

rm -rf "$WORKDIR"
mkdir -p "$(dirname "$WORKDIR")"
# minbase: dpkg, apt and the 'required' packages (passwd for useradd included); python3 with
# venv and pip for the gdmix venv; ca-certificates for pip's HTTPS.
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$WORKDIR" "$MIRROR"

# apt in the image (the spark image installs a JRE): the release, its updates and security.
cat > "$WORKDIR/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
# The host's locally added CAs (if any), into the image's trust store.
if [ -n "$EXTRA_CA_DIR" ] && compgen -G "$EXTRA_CA_DIR/*.crt" >/dev/null; then
    cp "$EXTRA_CA_DIR"/*.crt "$WORKDIR/usr/local/share/ca-certificates/"
    chroot "$WORKDIR" update-ca-certificates
fi
# Small: no package lists, no downloaded .debs, no docs or man pages.
rm -rf "$WORKDIR"/var/lib/apt/lists/* "$WORKDIR"/var/cache/apt/*.bin \
    "$WORKDIR"/var/cache/apt/archives/*.deb "$WORKDIR"/usr/share/doc/* "$WORKDIR"/usr/share/man/* \
    "$WORKDIR"/tmp/* "$WORKDIR"/var/log/*.log

# No device nodes (the runtime provides /dev). Import the folder as a one-layer image; tar
# keeps owners, modes and setuid bits (buildah copy would not).
rm -rf "${WORKDIR:?}"/dev/*
ctr=$(buildah from scratch)
trap 'buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$ctr")
tar -C "$WORKDIR" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
buildah commit --quiet --rm "$ctr" "$IMAGE"
trap - EXIT
rm -rf "$WORKDIR"
echo "made $IMAGE"
