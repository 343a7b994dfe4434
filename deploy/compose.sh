#!/usr/bin/env bash
# `make up` / `make down`: the stack under docker-compose (docker-compose.yml at the repository root).
#   deploy/compose.sh up     start it, wait until the gateway is healthy, print the URL and the token
#   deploy/compose.sh down   stop and remove the containers (function containers included); the state
#                            volume stays (`docker-compose down -v` removes it too)
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
else echo "docker-compose is not installed (apt-get install docker-compose)" >&2; exit 1; fi
HEALTH_TIMEOUT_S=${NUCLIDE_UP_TIMEOUT_S:-120}

case "${1:-}" in
up)
    "${COMPOSE[@]}" up -d
    gateway="$("${COMPOSE[@]}" ps -q gateway)"
    for _ in $(seq "$HEALTH_TIMEOUT_S"); do
        status="$(docker inspect --format '{{.State.Health.Status}}' "$gateway" 2>/dev/null || echo gone)"
        [ "$status" = healthy ] && break
        sleep 1
    done
    if [ "$status" != healthy ]; then
        echo "the gateway is not healthy after ${HEALTH_TIMEOUT_S} s ($status); see: ${COMPOSE[*]} logs" >&2
        exit 1
    fi
    token="$("${COMPOSE[@]}" exec -T gateway cat /var/lib/nuclide/token)"
    printf 'nuclide is up (docker-compose)\n  URL:    http://127.0.0.1:%s\n  token:  %s\n' "${NUCLIDE_HTTP_PORT:-8000}" "$token"
    printf '  again:  %s exec gateway cat /var/lib/nuclide/token\n' "${COMPOSE[*]}"
    ;;
down)
    "${COMPOSE[@]}" down
    ;;
*)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
