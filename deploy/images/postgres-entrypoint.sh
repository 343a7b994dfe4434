#!/bin/sh
# nuclide-postgres: the store's PostgreSQL for the stack on Docker Swarm (deploy/swarm/stack.yml).
#
# On first start it makes a cluster in $PGDATA (a volume) with one role and database, `nuclide`, whose
# password is read from $NUCLIDE_PGPASS_FILE (a libpq password file: host:port:database:user:password,
# a Swarm secret). It then serves on 127.0.0.1:$NUCLIDE_PG_PORT only: password (scram-sha-256) over TCP,
# nothing else; no Unix socket outside the container.
set -eu
PGDATA="${PGDATA:-/var/lib/nuclide-postgres/data}"
PORT="${NUCLIDE_PG_PORT:?NUCLIDE_PG_PORT: the port to listen on (127.0.0.1 only)}"
PASSFILE="${NUCLIDE_PGPASS_FILE:?NUCLIDE_PGPASS_FILE: the password file (a Swarm secret)}"
[ -r "$PASSFILE" ] || { echo "nuclide-postgres: $PASSFILE is not readable" >&2; exit 1; }
# the last field of the first line: host:port:database:user:password
password="$(head -n 1 "$PASSFILE" | sed 's/^\([^:]*:\)\{4\}//')"
[ -n "$password" ] || { echo "nuclide-postgres: no password in $PASSFILE" >&2; exit 1; }
parent="$(dirname "$PGDATA")"
mkdir -p "$parent"
chown postgres:postgres "$parent"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "$password" >"$pwfile"
    chown postgres "$pwfile"
    setpriv --reuid=postgres --regid=postgres --init-groups \
        initdb -D "$PGDATA" -U nuclide --pwfile="$pwfile" --auth-local=scram-sha-256 --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    # loopback only, password only
    printf 'local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n' >"$PGDATA/pg_hba.conf"
    as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
    as_pg pg_ctl -D "$PGDATA" -s -w -o "-c listen_addresses= -c unix_socket_directories=/run/postgresql" start
    PGPASSWORD="$password" as_pg psql -q -h /run/postgresql -U nuclide -d postgres -c 'CREATE DATABASE nuclide'
    as_pg pg_ctl -D "$PGDATA" -s -w stop
    echo "nuclide-postgres: made the cluster in $PGDATA (role and database nuclide)"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
    postgres -D "$PGDATA" -c listen_addresses=127.0.0.1 -c port="$PORT" -c unix_socket_directories=/run/postgresql
