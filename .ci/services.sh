#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306) are up.
# Idempotent: does nothing when they already answer. Installs the servers
# from Debian's packages on a machine that lacks them.
set -uo pipefail

wait_for() { # name, command
    for _ in $(seq 1 60); do
        if eval "$2" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "warning: $1 did not come up" >&2
    return 1
}

if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    wait_for postgresql "pg_isready -h 127.0.0.1 -p 5432"
fi

if ! mariadb -uroot -h127.0.0.1 -e 'select 1' >/dev/null 2>&1; then
    if ! command -v mariadbd >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null
    fi
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    wait_for mariadb "mariadb -uroot -h127.0.0.1 -e 'select 1'"
fi
exit 0
