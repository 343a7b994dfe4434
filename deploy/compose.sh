#!/usr/bin/env bash
# `make up` / `make down`: the stack under docker-compose (docker-compose.yml at the repository root).
#   deploy/compose.sh up     start it, wait until the gateway is healthy, print the URL and the token, and record
#                            them for the CLI (`nuclide login`), next to other stacks'
#   deploy/compose.sh down   stop and remove the containers (function containers included); the state
#                            volume stays (`docker-compose down -v` removes it too)
# Ports: NUCLIDE_PORT_BASE=N gives the stack ports N to N+7 as it does for `nuclide up`; a NUCLIDE_<NAME>_PORT
# of docker-compose.yml set on its own still wins. NUCLIDE_GATEWAYS=2 starts a second gateway (the compose profile
# `gateways`) at the first one's ports plus 10. PYTHON is nuclide's interpreter (the Makefile's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
else echo "docker-compose is not installed (apt-get install docker-compose)" >&2; exit 1; fi
HEALTH_TIMEOUT_S=${NUCLIDE_UP_TIMEOUT_S:-120}
# the project's name as docker-compose derives it, for docker-compose.yml's link volume name
COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-$(basename "$PWD" | tr '[:upper:]' '[:lower:]' | tr -cd 'a-z0-9_-')}
export COMPOSE_PROJECT_NAME
PY=${PYTHON:-.venv/bin/python}

case "${1:-}" in
up)
    command -v "$PY" >/dev/null || { echo "$PY not found: run make install, or set PYTHON" >&2; exit 1; }
    # The ports as `nuclide up` derives and checks them (a bad NUCLIDE_PORT_BASE or NUCLIDE_GATEWAYS stops here,
    # with its name); docker-compose.yml has one further gateway at most.
    ports="$("$PY" -m services.cli.main up --print-ports)"
    gateways=${NUCLIDE_GATEWAYS:-1}
    if [ "$gateways" -gt 2 ]; then
        echo "NUCLIDE_GATEWAYS=$gateways: docker-compose.yml runs 2 gateways at most (\`nuclide up --gateways N\` runs" \
             "up to 16)" >&2
        exit 2
    fi
    [ "$gateways" -lt 2 ] || export COMPOSE_PROFILES=gateways
    while read -r key port; do
        var=NUCLIDE_${key^^}
        [ "$key" = http_port ] || var=${var}_PORT
        [ -n "${!var:-}" ] || export "$var=$port"
    done <<< "$ports"
    "${COMPOSE[@]}" up -d
    gateway="$("${COMPOSE[@]}" ps -q gateway)"
    for _ in $(seq "$HEALTH_TIMEOUT_S"); do
        status="$(docker inspect --format '{{.State.Health.Status}}' "$gateway" 2>/dev/null || echo gone)"
        [ "$status" = healthy ] && break
        sleep 1
    done
    if [ "$status" != healthy ]; then
        echo "the gateway is not healthy after ${HEALTH_TIMEOUT_S} s ($status); see: ${COMPOSE[*]} logs." \
             "Is another stack on its ports ($(tr '\n' ' ' <<< "$ports"))? NUCLIDE_PORT_BASE=N moves this one" >&2
        exit 1
    fi
    if [ "$gateways" -ge 2 ]; then
        second="$("${COMPOSE[@]}" ps -q gateway-1)"
        for _ in $(seq "$HEALTH_TIMEOUT_S"); do
            status="$(docker inspect --format '{{.State.Health.Status}}' "$second" 2>/dev/null || echo gone)"
            [ "$status" = healthy ] && break
            sleep 1
        done
        if [ "$status" != healthy ]; then
            echo "gateway-1 is not healthy after ${HEALTH_TIMEOUT_S} s ($status); see: ${COMPOSE[*]} logs gateway-1" >&2
            exit 1
        fi
        printf 'gateway-1: http://127.0.0.1:%s\n' "$NUCLIDE_GATEWAY1_HTTP_PORT"
    fi
    url="http://127.0.0.1:$NUCLIDE_HTTP_PORT"
    project="$(docker inspect --format '{{index .Config.Labels "com.docker.compose.project"}}' "$gateway")"
    again="${COMPOSE[*]} -f $PWD/docker-compose.yml -p $project exec -T gateway cat /var/lib/nuclide/token"
    token="$("${COMPOSE[@]}" exec -T gateway cat /var/lib/nuclide/token)"
    printf 'nuclide is up (docker-compose)\n  URL:    %s\n  token:  %s\n  again:  %s\n' "$url" "$token" "$again"
    # on stdin, so the token stays out of the process list
    if recorded="$(printf '%s\n' "$token" | "$PY" -m services.cli.main login --url "$url" \
            --started-by "\`make up\` (docker-compose project $project)" --token-hint "\`$again\`" 2>&1)"; then
        printf '  CLI:    %s\n' "$recorded"
    else
        printf '  CLI:    not recorded (%s); pass --url and --token to nuclide\n' "$recorded" >&2
    fi
    ;;
down)
    COMPOSE_PROFILES=gateways "${COMPOSE[@]}" down  # the second gateway too, if it runs
    ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
