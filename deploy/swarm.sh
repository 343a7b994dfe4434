#!/usr/bin/env bash
# `make swarm-up` / `make swarm-down`: nuclide as a Docker Swarm stack (deploy/swarm/stack.yml).
#   deploy/swarm.sh up     check the engine is a swarm manager, build the images (deploy/images/build.sh),
#                          `docker stack deploy`, wait until the gateway answers /healthz, print the URL and the
#                          token, and record them for the CLI (`nuclide login`)
#   deploy/swarm.sh down   remove the stack and the function services its deployer made; the volumes stay
#                          (`docker volume rm <stack>_state <stack>_pgdata` removes them)
# Settings (environment): NUCLIDE_STACK (the stack's name, nuclide), NUCLIDE_PORT_BASE=N (ports N to N+7 as for
# `nuclide up`, and N+8 for PostgreSQL; else the defaults of `make run` and 5564), NUCLIDE_PG_PORT,
# NUCLIDE_IMAGE_TAG (latest), NUCLIDE_UP_TIMEOUT_S (180), PYTHON (nuclide's interpreter, the Makefile's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
STACK="${NUCLIDE_STACK:-nuclide}"
HEALTH_TIMEOUT_S=${NUCLIDE_UP_TIMEOUT_S:-180}
PY=${PYTHON:-.venv/bin/python}
STATE_DIR="${NUCLIDE_SWARM_DIR:-$PWD/deploy/.swarm}"
# the deployer labels the function services with this namespace; `down` removes them by it
export NUCLIDE_DOCKER_NAMESPACE="${NUCLIDE_DOCKER_NAMESPACE:-swarm-$STACK}"
export NUCLIDE_STACK_NAME="$STACK"

die() { printf 'swarm: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
[[ "$STACK" =~ ^[a-z][a-z0-9-]{0,30}$ ]] || die "NUCLIDE_STACK=$STACK: use lower-case letters, digits and '-' (at most 31)"

# the stack first (its deployer would start the function services again), then the function services it made
wait_gone() { # wait_gone LABEL: until no container carries it
    for _ in $(seq 120); do
        [ -z "$(docker ps -aq --filter "label=$1")" ] && return 0
        sleep 1
    done
    die "containers labelled $1 are still there after 120 s: docker ps -a --filter label=$1"
}
down() {
    local services
    docker stack rm "$STACK" >/dev/null 2>&1 || true
    wait_gone "com.docker.stack.namespace=$STACK"
    services="$(docker service ls -q --filter "label=nuclide.namespace=$NUCLIDE_DOCKER_NAMESPACE")"
    # shellcheck disable=SC2086
    [ -z "$services" ] || docker service rm $services >/dev/null
    wait_gone "nuclide.namespace=$NUCLIDE_DOCKER_NAMESPACE"
}

case "${1:-}" in
up)
    state="$(docker info --format '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}' 2>/dev/null)" \
        || die "the Docker Engine is not reachable; start it and retry"
    if [ "$state" != "active true" ]; then
        die "this Docker Engine is not a swarm manager ($state): run 'docker swarm init --advertise-addr 127.0.0.1'," \
            "then remove the networks it makes ('docker network rm ingress docker_gwbridge'): nuclide's services use the host network"
    fi
    command -v "$PY" >/dev/null || die "$PY not found: run make install, or set PYTHON"
    # the ports as `nuclide up` derives and checks them (a bad NUCLIDE_PORT_BASE stops here, with its name)
    ports="$("$PY" -m services.cli.main up --print-ports)"
    while read -r key port; do
        var=NUCLIDE_${key^^}
        [ "$key" = http_port ] || var=${var}_PORT
        [ -n "${!var:-}" ] || export "$var=$port"
    done <<< "$ports"
    if [ -z "${NUCLIDE_PG_PORT:-}" ]; then
        if [ -n "${NUCLIDE_PORT_BASE:-}" ]; then export NUCLIDE_PG_PORT=$((NUCLIDE_PORT_BASE + 8))
        else export NUCLIDE_PG_PORT=5564; fi
    fi
    PYTHON="$PY" deploy/images/build.sh
    # PostgreSQL's password, made once per stack (kept with the stack's data: the volume keeps the cluster)
    mkdir -p "$STATE_DIR"
    chmod 700 "$STATE_DIR"
    export NUCLIDE_PGPASS_FILE="$STATE_DIR/$STACK.pgpass"
    if [ ! -s "$NUCLIDE_PGPASS_FILE" ]; then
        (umask 077; printf '*:*:*:nuclide:%s\n' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$NUCLIDE_PGPASS_FILE")
    fi
    docker stack deploy --resolve-image never -c deploy/swarm/stack.yml "$STACK"
    url="http://127.0.0.1:$NUCLIDE_HTTP_PORT"
    healthy=""
    for _ in $(seq "$HEALTH_TIMEOUT_S"); do
        if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url/healthz" 2>/dev/null
        then healthy=1; break; fi
        sleep 1
    done
    if [ -z "$healthy" ]; then
        die "the gateway does not answer $url/healthz after ${HEALTH_TIMEOUT_S} s; see: docker stack ps $STACK" \
            "--no-trunc and docker service logs ${STACK}_gateway. Is another stack on its ports" \
            "($(tr '\n' ' ' <<< "$ports")pg $NUCLIDE_PG_PORT)? NUCLIDE_PORT_BASE=N moves this one"
    fi
    gateway="$(docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_gateway" | head -n 1)"
    again="docker exec \$(docker ps -q --filter label=com.docker.swarm.service.name=${STACK}_gateway) cat /var/lib/nuclide/token"
    token="$(docker exec "$gateway" cat /var/lib/nuclide/token)"
    printf 'nuclide is up (Docker Swarm stack %s)\n  URL:    %s\n  token:  %s\n  again:  %s\n' "$STACK" "$url" "$token" "$again"
    # on stdin, so the token stays out of the process list
    if recorded="$(printf '%s\n' "$token" | "$PY" -m services.cli.main login --url "$url" \
            --started-by "\`make swarm-up\` (Docker Swarm stack $STACK)" --token-hint "\`$again\`" 2>&1)"; then
        printf '  CLI:    %s\n' "$recorded"
    else
        printf '  CLI:    not recorded (%s); pass --url and --token to nuclide\n' "$recorded" >&2
    fi
    ;;
down)
    down
    ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
