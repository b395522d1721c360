#!/usr/bin/env bash
# A PostgreSQL cluster of the benchmarks' own, so latency figures do not
# depend on whatever tests or other programs use the shared server on 5432.
#
#   bash crates/stitch-bench/postgres-cluster.sh start   # prints the URL
#   STITCH_BENCH_POSTGRES_URL=$(bash crates/stitch-bench/postgres-cluster.sh url) \
#       target/release/stitch-bench cancel --only postgres
#   bash crates/stitch-bench/postgres-cluster.sh stop
#
# The cluster "stitch_bench" (installed major version) listens on
# 127.0.0.1:5434 with trust auth for loopback, server defaults otherwise
# (as the shared server; fsync on). It is made on first start; `drop`
# removes it. Needs Debian's postgresql-common (pg_createcluster), as
# .ci/services.sh installs; runs as root.
set -euo pipefail

CLUSTER=stitch_bench
PORT=${STITCH_BENCH_PG_PORT:-5434}
URL="postgres://postgres@127.0.0.1:$PORT/postgres"
version=$(ls /etc/postgresql | sort -n | tail -n1)

exists() { pg_lsclusters -h | awk '{print $2}' | grep -qx "$CLUSTER"; }
running() { pg_lsclusters -h | awk -v c="$CLUSTER" '$2 == c {print $4}' | grep -q online; }

case "${1:-start}" in
start)
    if ! exists; then
        pg_createcluster "$version" "$CLUSTER" -p "$PORT" >/dev/null
        conf=/etc/postgresql/$version/$CLUSTER
        printf '%s\n' "# Written by stitch's crates/stitch-bench/postgres-cluster.sh." \
            "local all all trust" "host all all 127.0.0.1/32 trust" >"$conf/pg_hba.conf"
        printf '%s\n' "listen_addresses = '127.0.0.1'" "max_connections = 200" \
            >"$conf/conf.d/stitch-bench.conf"
    fi
    if ! running; then
        pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" start
    fi
    for _ in $(seq 1 60); do
        # Polling: pg_isready is the server's own readiness probe.
        pg_isready -q -h 127.0.0.1 -p "$PORT" && break
        sleep 0.5
    done
    pg_isready -q -h 127.0.0.1 -p "$PORT"
    echo "$URL"
    ;;
url) echo "$URL" ;;
stop) if running; then pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" stop; fi ;;
drop) if exists; then pg_dropcluster --stop "$version" "$CLUSTER"; fi ;;
*)
    echo "usage: $0 start|url|stop|drop" >&2
    exit 2
    ;;
esac
