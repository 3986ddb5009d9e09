#!/usr/bin/env bash
# Build and run apirouter's container image with podman, as CI does (scripts/test.sh).
#
#   bash scripts/container.sh build              # the image, on a local Debian base
#   bash scripts/container.sh run [PODMAN-ARGS]  # run it detached: read-only, tmpfs /tmp
#   bash scripts/container.sh env                # the podman settings, for `eval`
#
# No image registry is needed: the base image is made from Debian's packages with
# mmdebstrap and cached in .cache/container/base.tar (about 220 MB; delete it to refresh).
# Needs root on Debian; missing packages are installed with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=.cache/container
BASE=localhost/apirouter-base:bookworm
IMAGE=${APIROUTER_IMAGE:-localhost/apirouter:test}
PACKAGES=(podman runc catatonit iptables uidmap mmdebstrap slirp4netns)

# podman's defaults do not fit these machines: crun refuses the host's cgroup layout, and
# the default open-files limit exceeds the hard limit (runc: "error setting rlimit").
podman_env() {
    mkdir -p "$CACHE"
    local nofile
    nofile=$(ulimit -Hn)
    cat >"$CACHE/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF="$PWD/$CACHE/containers.conf"
}

install_tools() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if ((${#missing[@]})); then
        apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

base_image() {
    if [ ! -s "$CACHE/base.tar" ]; then
        mmdebstrap --variant=minbase --format=tar \
            --include=python3,python3-venv,ca-certificates bookworm "$CACHE/base.tar.part"
        mv "$CACHE/base.tar.part" "$CACHE/base.tar"
    fi
    podman image exists "$BASE" || podman import "$CACHE/base.tar" "$BASE" >/dev/null
}

build() {
    install_tools
    podman_env
    base_image
    # docker format: OCI images drop HEALTHCHECK.
    podman build --format docker --build-arg "BASE_IMAGE=$BASE" \
        --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt \
        -t "$IMAGE" -f Containerfile .
}

run() {
    podman_env
    # Read-only root; /tmp is a tmpfs (RAM) holding waitress's spooled request bodies.
    podman run -d --read-only --tmpfs /tmp:rw,size=256m,mode=1777 "$@" "$IMAGE"
}

case "${1:-}" in
build) build ;;
run) shift && run "$@" ;;
env) podman_env && echo "export CONTAINERS_CONF=$CONTAINERS_CONF" ;;
*) sed -n '2,11p' "$0" >&2 && exit 2 ;;
esac
