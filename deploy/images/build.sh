#!/usr/bin/env bash
# Builds nuclide's container images with no registry (what `make images` runs).
#
#   nuclide-base:<key>       Debian minbase + python3 and the runtime's Debian packages
#                            (debootstrap from the host's apt mirror, then `docker import`)
#   nuclide-runtime:<tag>    base + shared/ and services/runtime/: what function containers run
#   nuclide-services:<tag>   base + the services' Python dependencies (installed on the host with
#                            `pip install --target` for CPython 3.11, copied in) + all of nuclide's code
#   nuclide-postgres:<tag>   Debian minbase + postgresql-15 (debootstrap, `docker import`) + deploy/images/postgres-entrypoint.sh:
#                            the store's database for the stack on Docker Swarm (deploy/swarm/stack.yml)
#
# Incremental: each image carries the hash of its inputs in the label nuclide.inputs and is only
# rebuilt when that hash changes; the debootstrap root filesystem and the services' dependencies are
# cached under deploy/.cache (gitignored). A second run with nothing changed takes about a second.
#
# Settings (environment): NUCLIDE_IMAGE_TAG (latest), NUCLIDE_DEBIAN_MIRROR (the host's apt mirror for
# the suite, else http://deb.debian.org/debian), NUCLIDE_IMAGE_PYTHONS (e.g. "3.13": also nuclide-runtime:<tag>-py3.13,
# the runtime on the Debian release that ships that Python, for functions with spec.runtime python:3.13), NUCLIDE_IMAGE_CACHE (deploy/.cache), PYTHON (the
# interpreter whose pip installs the services' dependencies: .venv/bin/python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TAG="${NUCLIDE_IMAGE_TAG:-latest}"
SUITE=bookworm
CACHE="${NUCLIDE_IMAGE_CACHE:-$ROOT/deploy/.cache}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# python3-cffi-backend must be named next to python3-zmq (debootstrap does not resolve virtual packages);
# python3-pip installs a function's requirements inside its image build
PACKAGES="python3,python3-zmq,python3-cffi-backend,python3-msgpack,python3-requests,python3-pip,ca-certificates"
PY_VERSION=3.11 # the Debian bookworm interpreter the images run
export DOCKER_BUILDKIT=0 # the classic builder: no buildx needed, and it sees local images only

say() { printf 'images: %s\n' "$*"; }
die() { printf 'images: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "the Docker Engine is not reachable; start it (e.g. 'dockerd --bridge=none &') and retry"
mkdir -p "$CACHE"

# the mirror the host's apt uses for $SUITE, so the image gets the same packages the host can reach
mirror() { # mirror SUITE
    if [ -n "${NUCLIDE_DEBIAN_MIRROR:-}" ]; then echo "$NUCLIDE_DEBIAN_MIRROR"; return; fi
    "$PYTHON" - "$1" <<'EOF'
import glob, sys
suite = sys.argv[1]
found = None
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):  # deb822 stanzas
        for stanza in text.split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and suite in fields.get("suites", []) and fields.get("uris"):
                found = found or fields["uris"][0]
    elif path.endswith(".list"):
        for line in text.splitlines():
            words = [w for w in line.split() if not w.startswith("[")] if not line.lstrip().startswith("#") else []
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                found = found or words[1]
print(found or "http://deb.debian.org/debian")
EOF
}

sha() { sha256sum | cut -c1-24; }
label_of() { docker image inspect --format '{{index .Config.Labels "nuclide.inputs"}}' "$1" 2>/dev/null || true; }
# a stable hash of a directory's file names, modes and contents
tree_hash() { (cd "$1" && find . -type f -printf '%m %p\n' | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r cat) | sha; }
stage_code() { # stage_code DEST PATH...: nuclide's source files, without caches
    local dest="$1"; shift
    mkdir -p "$dest"
    tar -C "$ROOT" -c --exclude=__pycache__ --exclude='*.pyc' "$@" | tar -C "$dest" -x --no-same-owner
    chmod -R u=rwX,go=rX "$dest"
}

# ---- base: debootstrap + docker import --------------------------------------------------------
ROOTFS_KEPT=""
base_image() { # base_image SUITE: sets BASE and BASE_KEY, importing the image (debootstrap once) when missing
    local suite="$1" mirror rootfs dir
    mirror="$(mirror "$suite")"
    BASE_KEY="$(printf 'v1 %s %s minbase %s' "$suite" "$mirror" "$PACKAGES" | sha)"
    BASE="nuclide-base:$BASE_KEY"
    rootfs="$CACHE/rootfs-$suite-$BASE_KEY.tar"
    ROOTFS_KEPT="$ROOTFS_KEPT $(basename "$rootfs")"
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        say "$BASE is up to date"
        return
    fi
    if [ ! -f "$rootfs" ]; then
        command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
        [ "$(id -u)" = 0 ] || die "debootstrap needs root; run 'make images' as root once (the rootfs is cached)"
        dir="$CACHE/rootfs-$BASE_KEY.tmp"
        rm -rf "$dir"
        say "debootstrap $suite from $mirror (about a minute, once; log: $CACHE/debootstrap.log)"
        if ! debootstrap --variant=minbase --include="$PACKAGES" "$suite" "$dir" "$mirror" >"$CACHE/debootstrap.log" 2>&1; then
            tail -n 20 "$CACHE/debootstrap.log" >&2
            rm -rf "$dir"
            die "debootstrap $suite failed (log above)"
        fi
        # what the image does not need: package lists and archives, manuals
        rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin \
            "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/* "$dir"/tmp/*
        tar -C "$dir" --numeric-owner -cf "$rootfs.tmp" .
        mv "$rootfs.tmp" "$rootfs"
        rm -rf "$dir"
    fi
    say "importing $BASE"
    docker import --message "nuclide base: debootstrap $suite ($PACKAGES)" "$rootfs" "$BASE" >/dev/null
}

build() { # build IMAGE INPUTS_HASH CONTEXT_DIR
    local image="$1" inputs="$2" ctx="$3"
    if [ "$(label_of "$image")" = "$inputs" ]; then
        say "$image is up to date"
        return
    fi
    say "building $image"
    local previous
    previous="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
    if ! docker build -q --force-rm --network host --label "nuclide.inputs=$inputs" -t "$image" "$ctx" >"$CACHE/build.log" 2>&1; then
        tail -n 30 "$CACHE/build.log" >&2
        die "building $image failed (log above)"
    fi
    # the image this one replaces, unless containers or function images still use it
    [ -z "$previous" ] || docker rmi "$previous" >/dev/null 2>&1 || true
}

# ---- runtime: what a function container runs ---------------------------------------------------
runtime_image() { # runtime_image IMAGE: the runtime on $BASE (its check fails on a Python nuclide cannot run on)
    local ctx="$CACHE/ctx-runtime"
    rm -rf "$ctx"
    stage_code "$ctx/opt/nuclide" shared services/__init__.py services/runtime
    cat >"$ctx/Dockerfile" <<EOF
FROM $BASE
ENV PYTHONPATH=/opt/nuclide LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY opt/ /opt/
# compiled once here: function containers have a read-only root filesystem
RUN python3 -m compileall -q /opt/nuclide && python3 -c "import zmq, msgpack, requests, services.runtime.loop"
USER 65534:65534
WORKDIR /tmp
CMD ["python3", "-m", "services.runtime"]
EOF
    build "$1" "$(printf '%s %s' "$BASE_KEY" "$(tree_hash "$ctx")" | sha)" "$ctx"
}

# a function whose spec.runtime is python:3.X runs in nuclide-runtime:<tag>-py3.X when that image exists:
# the runtime on the Debian release that ships that Python (NUCLIDE_IMAGE_PYTHONS="3.13" builds it)
suite_of() {
    case "$1" in
        3.11) echo bookworm ;;
        3.13) echo trixie ;;
        *) die "NUCLIDE_IMAGE_PYTHONS: $1 is not a Python a Debian release ships that nuclide runs on (3.10 or newer): use 3.11 (bookworm) or 3.13 (trixie)" ;;
    esac
}
for version in ${NUCLIDE_IMAGE_PYTHONS:-}; do
    base_image "$(suite_of "$version")"
    runtime_image "nuclide-runtime:$TAG-py$version"
done

base_image "$SUITE"
runtime_image "nuclide-runtime:$TAG"
# earlier root filesystems are not needed again
for tar in "$CACHE"/rootfs-*.tar; do
    [ -e "$tar" ] || continue
    case " $ROOTFS_KEPT " in *" $(basename "$tar") "*) ;; *) rm -f "$tar" ;; esac
done

# ---- services: gateway, store, deployer ----------------------------------------------------------
ARCH="$(uname -m)"
PLATFORMS=""
for minor in $(seq 36 -1 17); do PLATFORMS="$PLATFORMS --platform manylinux_2_${minor}_$ARCH"; done
PLATFORMS="$PLATFORMS --platform manylinux2014_$ARCH --platform manylinux2010_$ARCH --platform manylinux1_$ARCH"
REQS="$("$PYTHON" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$ROOT/pyproject.toml")"
SITE_KEY="$(printf '%s\n%s %s' "$REQS" "$PY_VERSION" "$PLATFORMS" | sha)"
SITE="$CACHE/site-$SITE_KEY"
if [ ! -d "$SITE" ]; then
    say "installing the services' dependencies for CPython $PY_VERSION ($ARCH) into $SITE"
    rm -rf "$SITE.tmp"
    printf '%s\n' "$REQS" >"$CACHE/services-requirements.txt"
    # on the host, so pip uses the host's trust store and index settings (a TLS proxy's CA included)
    # shellcheck disable=SC2086
    if ! "$PYTHON" -m pip install -q --disable-pip-version-check --no-input --target "$SITE.tmp" \
        --only-binary=:all: --implementation cp --python-version "$PY_VERSION" $PLATFORMS \
        -r "$CACHE/services-requirements.txt" >"$CACHE/pip.log" 2>&1; then
        tail -n 30 "$CACHE/pip.log" >&2
        rm -rf "$SITE.tmp"
        die "installing the services' dependencies failed (log above)"
    fi
    chmod -R u=rwX,go=rX "$SITE.tmp"
    mv "$SITE.tmp" "$SITE"
fi
find "$CACHE" -maxdepth 1 -name 'site-*' ! -name "site-$SITE_KEY" -exec rm -rf {} +

ctx="$CACHE/ctx-services"
rm -rf "$ctx"
mkdir -p "$ctx"
cp -al "$SITE" "$ctx/site" 2>/dev/null || cp -a "$SITE" "$ctx/site"
stage_code "$ctx/opt/nuclide" shared services
cat >"$ctx/Dockerfile" <<EOF
FROM $BASE
ENV PYTHONPATH=/opt/nuclide:/opt/nuclide/site PATH=/opt/nuclide/site/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 NUCLIDE_VAR_DIR=/var/lib/nuclide
# the deployer attaches slirp4netns to function containers (services/deployer/backends/docker/runner/usernet.py),
# from the mirror debootstrap used (the image build runs on the host's network); first, so the layer is cached
RUN apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slirp4netns >/dev/null \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/apt/*.bin && slirp4netns --version >/dev/null
# dependencies first, so a code change rebuilds only the small layer below
COPY site/ /opt/nuclide/site/
RUN python3 -m compileall -q -j 0 /opt/nuclide/site >/dev/null 2>&1; true
COPY opt/ /opt/
RUN python3 -m compileall -q /opt/nuclide/services /opt/nuclide/shared \\
    && python3 -c "import services.store.server, services.gateway.core, services.gateway.http, services.deployer.backends.docker.backend, httptools, uvloop, docker" \\
    && mkdir -p /var/lib/nuclide/run/link && chown -R 65534:65534 /var/lib/nuclide
WORKDIR /var/lib/nuclide
CMD ["python3", "-m", "services.cli.main", "--help"]
EOF
build "nuclide-services:$TAG" "$(printf '%s %s %s' "$BASE_KEY" "$SITE_KEY" "$(tree_hash "$ctx/opt")" | sha)" "$ctx"
# ---- postgres: the store's database for the stack on Docker Swarm ------------------------------
PG_PACKAGES="postgresql-15,ca-certificates"
PG_MIRROR="$(mirror "$SUITE")"
PG_KEY="$(printf 'v1 %s %s minbase %s' "$SUITE" "$PG_MIRROR" "$PG_PACKAGES" | sha)"
PG_BASE="nuclide-pgbase:$PG_KEY"
if ! docker image inspect "$PG_BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root; run 'make images' as root once"
    dir="$CACHE/pgroot-$PG_KEY.tmp"
    rm -rf "$dir"
    say "debootstrap $SUITE with $PG_PACKAGES (about a minute, once; log: $CACHE/debootstrap-pg.log)"
    if ! debootstrap --variant=minbase --include="$PG_PACKAGES" "$SUITE" "$dir" "$PG_MIRROR" \
            >"$CACHE/debootstrap-pg.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap-pg.log" >&2
        rm -rf "$dir"
        die "debootstrap $SUITE ($PG_PACKAGES) failed (log above)"
    fi
    # the package's own cluster is not used: the entrypoint makes one in the data volume
    rm -rf "$dir"/var/lib/postgresql/15/main "$dir"/etc/postgresql/15/main \
        "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin \
        "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/* "$dir"/tmp/*
    say "importing $PG_BASE"
    tar -C "$dir" --numeric-owner -c . \
        | docker import --message "nuclide postgres base: debootstrap $SUITE ($PG_PACKAGES)" - "$PG_BASE" >/dev/null
    rm -rf "$dir"
fi
ctx="$CACHE/ctx-postgres"
rm -rf "$ctx"
mkdir -p "$ctx"
install -m 0755 "$ROOT/deploy/images/postgres-entrypoint.sh" "$ctx/entrypoint.sh"
cat >"$ctx/Dockerfile" <<EOF
FROM $PG_BASE
ENV LANG=C.UTF-8 PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY entrypoint.sh /usr/local/bin/nuclide-postgres
RUN mkdir -p /var/lib/nuclide-postgres /run/postgresql \\
    && chown postgres:postgres /var/lib/nuclide-postgres /run/postgresql && postgres --version
ENTRYPOINT ["/usr/local/bin/nuclide-postgres"]
EOF
build "nuclide-postgres:$TAG" "$(printf '%s %s' "$PG_KEY" "$(tree_hash "$ctx")" | sha)" "$ctx"
say "done: nuclide-runtime:$TAG nuclide-services:$TAG nuclide-postgres:$TAG"
