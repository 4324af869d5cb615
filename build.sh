#!/usr/bin/env bash
# Build DisconManager's images on this machine alone, then optionally start the
# manager or run the test suite.
#
#   ./build.sh          build all images (base file systems, wheels, controllers, manager)
#   ./build.sh start    build, set up .venv (discon-check) and build/controllers, then
#                       start the manager with docker-compose and wait for /health
#   ./build.sh test     build, set up .venv, run the whole test suite against the real engine
#
# No registry is needed: the Debian base images are made with debootstrap from
# Debian's package mirror, and Python packages come from wheels downloaded here.
# Set BASE_IMAGE / BUILD_IMAGE to use images from a registry instead. A second
# run reuses every step whose inputs did not change.
set -euo pipefail
cd "$(dirname "$0")"

BASE_IMAGE=${BASE_IMAGE:-discon-base-runtime:bookworm}
BUILD_IMAGE=${BUILD_IMAGE:-discon-base-build:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NETWORK=${DISCON_NETWORK:-discon-net}
PYTHON=${PYTHON:-python3}
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

need_apt() { # install Debian packages that provide the given commands, when missing
  local missing=()
  while [ $# -gt 0 ]; do command -v "$1" >/dev/null 2>&1 || missing+=("$2"); shift 2; done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: run 'sudo apt-get install ${missing[*]}'"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

base_image() { # NAME PACKAGES: a Debian bookworm minbase root fs imported as an image
  local name=$1 pkgs=$2
  docker image inspect "$name" >/dev/null 2>&1 && return 0
  case "$name" in
    discon-base-*) ;;
    *) say "pulling $name"; docker pull "$name"; return 0 ;;
  esac
  need_apt debootstrap debootstrap
  [ "$(id -u)" = 0 ] || die "debootstrap needs root to make $name (or set BASE_IMAGE/BUILD_IMAGE)"
  local root; root=$(mktemp -d /tmp/discon-rootfs.XXXXXX)
  say "debootstrap bookworm ($pkgs) -> $name"
  mkdir -p build/debcache
  debootstrap --variant=minbase --cache-dir="$PWD/build/debcache" --include="$pkgs" \
    bookworm "$root" "$MIRROR" >build/debootstrap-"${name%%:*}".log 2>&1 \
    || { rm -rf "$root"; die "debootstrap failed: see build/debootstrap-${name%%:*}.log"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$name" >/dev/null
  rm -rf "$root"
}

wheels() { # build/wheels/deps: runtime dependencies; build/wheels/app: this package
  local stamp; stamp=$(cat setup.cfg | sha256sum | cut -c1-16)
  if [ "$(cat build/wheels/deps/.stamp 2>/dev/null)" != "$stamp" ]; then
    say "downloading dependency wheels"
    rm -rf build/wheels/deps && mkdir -p build/wheels/deps
    local reqs
    reqs=$("$PYTHON" - <<'PY'
import configparser
c = configparser.ConfigParser(); c.read("setup.cfg")
print(" ".join(r.strip() for r in c["options"]["install_requires"].splitlines() if r.strip()))
PY
)
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download -q --dest build/wheels/deps --only-binary=:all: \
      --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
      --platform manylinux_2_36_x86_64 --platform manylinux_2_34_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any $reqs
    echo "$stamp" > build/wheels/deps/.stamp
  fi
  # this package's wheel, rebuilt only when its sources change, with fixed
  # timestamps so that an unchanged wheel keeps Docker's layer cache valid
  stamp=$(cat setup.cfg pyproject.toml README.md $(find discon_manager twisted_plugins -name '*.py' | sort) | sha256sum | cut -c1-16)
  if [ "$(cat build/wheels/app/.stamp 2>/dev/null)" != "$stamp" ]; then
    say "building the discon-manager wheel"
    rm -rf build/wheels/app && mkdir -p build/wheels/app
    SOURCE_DATE_EPOCH=315532800 "$PYTHON" -m pip wheel -q --no-deps --wheel-dir build/wheels/app . >/dev/null
    rm -rf build/lib build/bdist* ./*.egg-info
    echo "$stamp" > build/wheels/app/.stamp
  fi
}

image() { # TARGET TAG
  say "docker build --target $1 -> $2"
  docker build -q --target "$1" -t "$2" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg BUILD_IMAGE="$BUILD_IMAGE" \
    --build-arg CREATED="$CREATED" . 2>&1 >/dev/null | grep -v -e DEPRECATED -e "legacy builder" -e BuildKit -e "environment-variable" -e "^ *$" >&2 || true
}

build_all() {
  command -v docker >/dev/null || die "docker is not installed"
  docker info >/dev/null 2>&1 || die "the Docker engine is not reachable: start it (systemctl start docker)"
  base_image "$BASE_IMAGE" python3,python3-venv,libgfortran5
  base_image "$BUILD_IMAGE" gcc,gfortran,libc6-dev,make
  wheels
  CREATED=$(git log -1 --format=%cI 2>/dev/null || echo unknown)
  image server-default discon-server:latest
  image server-nrel5mw discon-server-nrel5mw:latest
  image manager discon-manager:latest
  docker network inspect "$NETWORK" >/dev/null 2>&1 || docker network create "$NETWORK" >/dev/null
  say "images ready: discon-server:latest discon-server-nrel5mw:latest discon-manager:latest"
}

venv() { # .venv with the package (non-editable: twistd finds its plugins) and test tools
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q ".[test]"
  rm -rf build/lib build/bdist* ./*.egg-info
}

case "${1:-build}" in
  build) build_all ;;
  start)
    need_apt gcc gcc gfortran gfortran make make
    build_all
    venv
    make -s -C tests/controllers OUT="$PWD/build/controllers"
    docker-compose up -d
    port=${DISCON_MANAGER_PORT:-8080}
    for _ in $(seq 1 60); do
      if "$PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
        say "manager up: clients use DISCON_SERVER_ADDR=127.0.0.1:$port or 127.0.0.1:$port/<controller>"
        say "health: http://127.0.0.1:$port/health   check: .venv/bin/discon-check --server 127.0.0.1:$port/nrel5mw --infile tests/data/nrel5mw/DISCON.IN"
        exit 0
      fi
      sleep 1
    done
    docker-compose logs --tail 40 manager
    die "the manager did not answer http://127.0.0.1:$port/health within 60 s (logs above)"
    ;;
  test)
    need_apt gcc gcc gfortran gfortran make make
    build_all
    venv
    shift
    exec .venv/bin/python -m pytest "$@"
    ;;
  *) die "unknown command '$1': use build, start or test" ;;
esac
