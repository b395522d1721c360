#!/usr/bin/env bash
# Database servers that accept only TLS connections, for the storage TLS
# tests (crates/stitch-store/tests/tls.rs):
#   - PostgreSQL: a second cluster "stitch_tls" of the installed version at
#     127.0.0.1:5433, `hostssl` lines only in pg_hba.conf;
#   - MariaDB: a second mariadbd at 127.0.0.1:3307 with its own data
#     directory and require_secure_transport=ON.
# The shared servers on 5432/3306 are not touched. Their certificates come
# from a CA made here: $DIR/ca.crt (readable by everyone) signs a server
# certificate for 127.0.0.1 and localhost. The tests read the locations
# from the environment .ci/run exports:
#   STITCH_TEST_POSTGRES_TLS_URL, STITCH_TEST_MYSQL_TLS_URL, STITCH_TEST_TLS_CA
#
# Idempotent and quick when everything is up already; runs as root (CI
# and the developers' machines run as root). Needs the packages
# .ci/services.sh installs, and openssl.
set -euo pipefail

DIR=/var/lib/stitch-test-tls
PG_PORT=5433
PG_CLUSTER=stitch_tls
MARIADB_PORT=3307

mkdir -p "$DIR"
chmod 0755 "$DIR"
# Two CI runs or a developer beside CI: one setup at a time. Servers started
# below get the lock's descriptor closed (9>&-), or they would hold it.
exec 9>"$DIR/.lock"
flock 9

log() { echo "database-tls: $*"; }

wait_for() { # name, command
    for _ in $(seq 1 60); do
        if eval "$2" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "database-tls: $1 did not come up" >&2
    return 1
}

if ! command -v openssl >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

# --- certificates ---------------------------------------------------------
# A new CA and server certificate when missing or expiring within a week.
# The servers then get the new files (reload/restart below).
certs_changed=0
if ! [ -s "$DIR/ca.crt" ] || ! [ -s "$DIR/server.crt" ] || ! [ -s "$DIR/server.key" ] ||
    ! openssl x509 -in "$DIR/server.crt" -noout -checkend 604800 >/dev/null 2>&1 ||
    ! openssl verify -CAfile "$DIR/ca.crt" "$DIR/server.crt" >/dev/null 2>&1; then
    log "making a CA and a server certificate in $DIR"
    work=$(mktemp -d)
    cat >"$work/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = stitch test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
authorityKeyIdentifier = keyid
EOF
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -config "$work/openssl.cnf" -extensions ca -subj "/CN=stitch test CA" \
        -days 3650 -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -config "$work/openssl.cnf" -subj "/CN=127.0.0.1" \
        -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
    openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
        -set_serial "0x$(openssl rand -hex 8)" -days 825 \
        -extfile "$work/openssl.cnf" -extensions server -out "$work/server.crt" 2>/dev/null
    install -m 0600 "$work/ca.key" "$DIR/ca.key"
    install -m 0600 "$work/server.key" "$DIR/server.key"
    install -m 0644 "$work/server.crt" "$DIR/server.crt"
    # The CA last: its presence means the set is complete.
    install -m 0644 "$work/ca.crt" "$DIR/ca.crt"
    rm -rf "$work"
    certs_changed=1
fi

# Each server reads its own copy of the key, owned by its user.
install_key_for() { # user, target dir
    install -d -m 0750 -o "$1" -g "$1" "$2"
    if [ "$certs_changed" = 1 ] || ! cmp -s "$DIR/server.key" "$2/server.key"; then
        install -m 0600 -o "$1" -g "$1" "$DIR/server.key" "$2/server.key"
        install -m 0644 -o "$1" -g "$1" "$DIR/server.crt" "$2/server.crt"
        install -m 0644 -o "$1" -g "$1" "$DIR/ca.crt" "$2/ca.crt"
        return 0
    fi
    return 1
}

# Writes $2 into file $1 when it differs; true when it changed.
write_if_changed() { # file, content
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then
        return 1
    fi
    printf '%s\n' "$2" >"$1"
    return 0
}

# --- PostgreSQL -------------------------------------------------------------
pg_version=$(ls /etc/postgresql | sort -n | tail -n1)
pg_changed=0 # 1: reload (certificate, pg_hba.conf); 2: restart (port, ...)
if install_key_for postgres "$DIR/postgres"; then pg_changed=1; fi
if ! pg_lsclusters -h | awk '{print $2}' | grep -qx "$PG_CLUSTER"; then
    log "creating PostgreSQL cluster $pg_version/$PG_CLUSTER on port $PG_PORT"
    pg_createcluster "$pg_version" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null
fi
pg_conf=/etc/postgresql/$pg_version/$PG_CLUSTER
if write_if_changed "$pg_conf/conf.d/stitch-tls.conf" "# Written by stitch's .ci/database-tls.sh.
listen_addresses = '127.0.0.1'
port = $PG_PORT
ssl = on
ssl_cert_file = '$DIR/postgres/server.crt'
ssl_key_file = '$DIR/postgres/server.key'
shared_buffers = 32MB
max_connections = 100"; then pg_changed=2; fi
# TLS or nothing: no plain host lines, so a connection without TLS is refused.
if write_if_changed "$pg_conf/pg_hba.conf" "# Written by stitch's .ci/database-tls.sh: TLS connections only.
local all postgres peer
hostssl all all 127.0.0.1/32 trust"; then pg_changed=$((pg_changed > 1 ? 2 : 1)); fi

pg_running() { pg_lsclusters -h | awk -v c="$PG_CLUSTER" '$2 == c {print $4}' | grep -q online; }
if ! pg_running; then
    log "starting PostgreSQL cluster $PG_CLUSTER"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$PG_CLUSTER" start 9>&-
elif [ "$pg_changed" = 2 ]; then
    log "restarting PostgreSQL cluster $PG_CLUSTER (new settings)"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$PG_CLUSTER" restart 9>&-
elif [ "$pg_changed" = 1 ]; then
    log "reloading PostgreSQL cluster $PG_CLUSTER (new settings or certificate)"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$PG_CLUSTER" reload 9>&-
fi
wait_for "PostgreSQL on $PG_PORT" "pg_isready -q -h 127.0.0.1 -p $PG_PORT"
psql_local() { runuser -u postgres -- psql -X -q -p "$PG_PORT" -d postgres -tA "$@"; }
if [ "$(psql_local -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
    psql_local -c "CREATE DATABASE test"
fi

# --- MariaDB ----------------------------------------------------------------
# Its own data directory and socket, and the global option files ignored
# (--defaults-file), so the shared instance on 3306 is not affected.
my_dir=$DIR/mariadb
my_sock=$my_dir/mariadbd.sock
my_changed=0
if install_key_for mysql "$my_dir"; then my_changed=1; fi
if write_if_changed "$my_dir/my.cnf" "# Written by stitch's .ci/database-tls.sh.
[mariadbd]
user = mysql
datadir = $my_dir/data
port = $MARIADB_PORT
bind-address = 127.0.0.1
socket = $my_sock
pid-file = $my_dir/mariadbd.pid
log-error = $my_dir/error.log
ssl-ca = $my_dir/ca.crt
ssl-cert = $my_dir/server.crt
ssl-key = $my_dir/server.key
require-secure-transport = ON
innodb-buffer-pool-size = 32M
performance-schema = OFF"; then my_changed=1; fi
chmod 0644 "$my_dir/my.cnf"
if ! [ -d "$my_dir/data/mysql" ]; then
    log "initialising a MariaDB data directory in $my_dir/data"
    rm -rf "$my_dir/data"
    mariadb-install-db --defaults-file="$my_dir/my.cnf" --auth-root-authentication-method=normal \
        --skip-test-db >"$my_dir/install.log" 2>&1 9>&-
fi

my_running() { mariadb-admin --no-defaults -S "$my_sock" -uroot ping >/dev/null 2>&1; }
if my_running && [ "$my_changed" = 1 ]; then
    log "restarting MariaDB on $MARIADB_PORT (new settings or certificate)"
    mariadb-admin --no-defaults -S "$my_sock" -uroot shutdown
fi
if ! my_running; then
    log "starting MariaDB on $MARIADB_PORT"
    setsid /usr/sbin/mariadbd --defaults-file="$my_dir/my.cnf" </dev/null >>"$my_dir/error.log" 2>&1 9>&- &
    wait_for "MariaDB on $MARIADB_PORT" my_running
fi
mariadb --no-defaults -S "$my_sock" -uroot -e "CREATE DATABASE IF NOT EXISTS test"
