#!/usr/bin/env bash
# `make image`: builds the one image of the system with whatever container
# tool is present and working: docker (with a reachable daemon), podman, or
# buildah. Settings (environment):
#   IMAGE           tag to build (default incident-response:dev)
#   BASE_IMAGE      the Dockerfile's base (default: the Dockerfile's, python slim)
#   CA_BUNDLE       a CA bundle pip needs to reach its index; a build secret,
#                   never stored in the image
#   CONTAINER_TOOL  docker | podman | buildah, instead of the first that works
#   BUILD_NETWORK   e.g. host, when the build's own network cannot reach the index
set -euo pipefail
cd "$(dirname "$0")/.."

pick() {
  if [ -n "${CONTAINER_TOOL:-}" ]; then echo "$CONTAINER_TOOL"; return; fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  if command -v podman >/dev/null 2>&1; then echo podman; return; fi
  if command -v buildah >/dev/null 2>&1; then echo buildah; return; fi
  echo "build-image: no container tool: install docker, podman or buildah (Debian: apt-get install podman runc)" >&2
  exit 1
}

tool=$(pick)
args=(-t "${IMAGE:-incident-response:dev}" -f Dockerfile)
[ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ -n "${CA_BUNDLE:-}" ]; then
  [ -r "$CA_BUNDLE" ] || { echo "build-image: CA_BUNDLE=$CA_BUNDLE is not a readable file" >&2; exit 1; }
  args+=(--secret "id=ca,src=$CA_BUNDLE")
fi
[ -n "${BUILD_NETWORK:-}" ] && args+=("--network=$BUILD_NETWORK")
case "$tool" in
  docker|podman) exec "$tool" build "${args[@]}" . ;;
  buildah) exec buildah build "${args[@]}" . ;;
  *) echo "build-image: CONTAINER_TOOL must be docker, podman or buildah, not $tool" >&2; exit 1 ;;
esac
