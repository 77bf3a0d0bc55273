#!/usr/bin/env bash
# Makes a real PostgreSQL server available on 127.0.0.1 for the cloud's tests and prints the
# shell line that exports its URL:
#
#     eval "$(bash cloud/scripts/postgres.sh)"   # sets TIDESYNC_TEST_POSTGRES_URL
#
# When no PostgreSQL is installed it installs Debian's `postgresql` package (as root, via
# apt-get). It then starts a private server (initdb + pg_ctl in a directory of its own, as the
# `postgres` user when run as root) unless one already answers on the port. Idempotent: a second
# run finds the running server. Everything but the export line goes to stderr.
set -euo pipefail

port="${TIDESYNC_TEST_POSTGRES_PORT:-54329}"
dir="${TIDESYNC_TEST_POSTGRES_DIR:-/tmp/tidesync-postgres-$port}"
user="tidesync"
say() { printf 'postgres.sh: %s\n' "$*" >&2; }

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

bin="$(find_bin || true)"
if [ -z "$bin" ] || [ ! -x "$bin/pg_ctl" ]; then
    say "PostgreSQL is missing: installing Debian's postgresql package"
    if [ "$(id -u)" -ne 0 ]; then
        say "installing needs root (apt-get); run as root or install postgresql first"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    bin="$(find_bin)"
fi

url="postgresql://$user@127.0.0.1:$port/postgres"
if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    say "a server already answers on 127.0.0.1:$port"
    printf 'export TIDESYNC_TEST_POSTGRES_URL=%q\n' "$url"
    exit 0
fi

# initdb and postgres refuse to run as root: run them as the postgres user when we are root.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

mkdir -p "$dir"
if [ "$(id -u)" -eq 0 ]; then chown postgres: "$dir"; fi
if [ ! -f "$dir/data/PG_VERSION" ]; then
    say "creating a cluster in $dir/data"
    as_owner "$bin/initdb" -D "$dir/data" -U "$user" -A trust -E UTF8 --no-instructions >&2
fi
say "starting PostgreSQL ($bin) on 127.0.0.1:$port"
as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >&2
"$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -t 30
printf 'export TIDESYNC_TEST_POSTGRES_URL=%q\n' "$url"
