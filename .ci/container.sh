#!/usr/bin/env bash
# CI step: build the container image from docker/Dockerfile, then run
# test/integ/test_container.py against it (host networking, controller
# simulator, grpcio from outside). Budget: ~15 minutes in all.
#
# There is no Docker engine here: ../shared/tools/container.sh builds the
# standard Dockerfile with buildah (chroot isolation, base images made with
# debootstrap) and installs buildah/podman/debootstrap itself when missing.
#
#   .ci/container.sh                 build + test, remove the image afterwards
#   ZM_KEEP_IMAGE=1 .ci/container.sh keep localhost/ziti-management:ci
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONTAINER_SH=${CONTAINER_SH:-$(cd .. && pwd)/shared/tools/container.sh}
# a clone elsewhere than beside shared/ (as .ci/fresh-debian-check.sh does)
[[ -x $CONTAINER_SH ]] || CONTAINER_SH=/work/shared/tools/container.sh
TAG=${ZM_IMAGE_TAG:-localhost/ziti-management:ci}
LOGDIR=${ZM_CI_LOGDIR:-$(mktemp -d /tmp/zm-container-ci.XXXXXX)}
[[ -x $CONTAINER_SH ]] || { echo "container.sh not found at $CONTAINER_SH" >&2; exit 1; }

# HEALTHCHECK exists only in the Docker image format (OCI has no field for it).
export BUILDAH_FORMAT=docker

cleanup() {
  if [[ ${ZM_KEEP_IMAGE:-0} != 1 ]]; then podman rmi -f "$TAG" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "== container: building $TAG (log: $LOGDIR/build.log)"
t0=$(date +%s)
if ! timeout 720 "$CONTAINER_SH" build docker/Dockerfile . "$TAG" >"$LOGDIR/build.log" 2>&1; then
  grep -vE '^(\(Reading database|Preparing to unpack|Unpacking|Selecting previously|Setting up|Processing triggers)' \
    "$LOGDIR/build.log" | tail -n 60 >&2
  echo "== container: image build FAILED after $(($(date +%s) - t0)) s" >&2
  exit 1
fi
echo "== container: image built in $(($(date +%s) - t0)) s"

# Size and contents, for docker/README.md.
size=$(podman image inspect --format '{{.Size}}' "$TAG")
echo "== container: image size $size bytes ($((size / 1024)) KiB)"
ctr=$(buildah from --pull=never "$TAG")
mnt=$(buildah mount "$ctr")
(cd "$mnt" && find . -mindepth 1 \( -type f -o -type l \) -printf '%10s  %p\n' | sort -k2)
buildah rm "$ctr" >/dev/null

echo "== container: testing the image"
ZM_CONTAINER_IMAGE=$TAG ZM_CONTAINER_SH=$CONTAINER_SH PYTHONDONTWRITEBYTECODE=1 \
  timeout 600 /usr/bin/python3 -m pytest -q -p no:cacheprovider "$ROOT/test/integ/test_container.py"
echo "== container: OK"
