# shellcheck shell=bash
# PostgreSQL for the tests. Source it (after common.sh); do not execute it.
#
# ensure_postgres
#   Makes sure a local PostgreSQL server runs and that the role
#   fastjoin/fastjoin (LOGIN SUPERUSER) exists, then exports:
#     FASTJOIN_POSTGRES       postgresql://fastjoin:fastjoin@127.0.0.1:<port>/postgres
#     FASTJOIN_PG_HOST/PORT/USER/PASSWORD
#   Installs Debian's `postgresql` when no server is installed, creates the
#   cluster when there is none, and starts it when it is down. It changes no
#   configuration file. If it had to start the cluster, it sets
#   FASTJOIN_PG_STARTED_BY_US=<version>/<name>; the server is left running
#   (other runs on the machine may share it), but stop_postgres_if_started
#   stops it again when FASTJOIN_STOP_POSTGRES=1.
#   FASTJOIN_PG_CLUSTER picks another cluster name than `main`.
#
# Works as root with no stdin; as another user it needs password-less sudo.

if [[ -n "${_FASTJOIN_POSTGRES_SH:-}" ]]; then
    return 0
fi
_FASTJOIN_POSTGRES_SH=1

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FASTJOIN_PG_USER=fastjoin
FASTJOIN_PG_PASSWORD=fastjoin
FASTJOIN_PG_HOST=127.0.0.1
FASTJOIN_PG_STARTED_BY_US="${FASTJOIN_PG_STARTED_BY_US:-}"

_pg_have_server() {
    command -v pg_ctlcluster >/dev/null 2>&1 \
        && command -v pg_lsclusters >/dev/null 2>&1 \
        && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# Highest installed server major version.
_pg_server_version() {
    local d v best=""
    for d in /usr/lib/postgresql/*/bin/postgres; do
        [[ -x "$d" ]] || continue
        v="${d#/usr/lib/postgresql/}"
        v="${v%%/*}"
        if [[ -z "$best" ]] || [[ "$v" =~ ^[0-9]+$ && "$v" -gt "$best" ]]; then
            best="$v"
        fi
    done
    printf '%s\n' "$best"
}

# _pg_cluster_field VER NAME FIELD(port|status): from pg_lsclusters.
_pg_cluster_field() {
    local ver="$1" name="$2" field="$3"
    pg_lsclusters --no-header 2>/dev/null | awk -v v="$ver" -v n="$name" -v f="$field" '
        $1 == v && $2 == n { print (f == "port" ? $3 : $4); exit }'
}

# Run psql as the postgres superuser over the local socket.
_pg_psql_admin() {
    local port="$1"
    shift
    (
        cd / || exit 1
        if [[ "$(id -u)" -eq 0 ]]; then
            runuser -u postgres -- psql -X -q -p "$port" -v ON_ERROR_STOP=1 "$@" </dev/null
        else
            sudo -n -u postgres psql -X -q -p "$port" -v ON_ERROR_STOP=1 "$@" </dev/null
        fi
    )
}

ensure_postgres() {
    local t0 ver name="${FASTJOIN_PG_CLUSTER:-main}" port status i
    t0="$(now_s)"

    if ! _pg_have_server; then
        log "no PostgreSQL server installed; installing Debian's postgresql"
        apt_install postgresql
        _pg_have_server || die "postgresql installed but pg_ctlcluster/postgres still missing"
    fi

    ver="$(_pg_server_version)"
    [[ -n "$ver" ]] || die "cannot find the installed PostgreSQL version under /usr/lib/postgresql"

    status="$(_pg_cluster_field "$ver" "$name" status)"
    if [[ -z "$status" ]]; then
        log "creating PostgreSQL cluster $ver/$name"
        as_root pg_createcluster "$ver" "$name" </dev/null >/dev/null \
            || die "pg_createcluster $ver $name failed"
        status="$(_pg_cluster_field "$ver" "$name" status)"
    fi
    port="$(_pg_cluster_field "$ver" "$name" port)"
    [[ "$port" =~ ^[0-9]+$ ]] || die "cannot read the port of cluster $ver/$name from pg_lsclusters"

    if [[ "$status" != online* ]]; then
        log "starting PostgreSQL cluster $ver/$name (port $port)"
        if ! as_root pg_ctlcluster "$ver" "$name" start </dev/null; then
            tail -n 20 "/var/log/postgresql/postgresql-$ver-$name.log" >&2 2>/dev/null || true
            die "pg_ctlcluster $ver $name start failed"
        fi
        FASTJOIN_PG_STARTED_BY_US="$ver/$name"
    fi

    # Wait until it accepts connections (socket and TCP).
    for ((i = 0; i < 60; i++)); do
        if pg_isready -q -h "$FASTJOIN_PG_HOST" -p "$port" -t 1 </dev/null \
            && _pg_psql_admin "$port" -Atc 'SELECT 1' >/dev/null 2>&1; then
            break
        fi
        sleep 0.5
    done
    ((i < 60)) || die "PostgreSQL $ver/$name on port $port does not accept connections after 30 s"

    # The role: superuser, so tests can create databases with C collation.
    local sql="DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '$FASTJOIN_PG_USER') THEN
        CREATE ROLE $FASTJOIN_PG_USER LOGIN SUPERUSER PASSWORD '$FASTJOIN_PG_PASSWORD';
    ELSE
        ALTER ROLE $FASTJOIN_PG_USER LOGIN SUPERUSER PASSWORD '$FASTJOIN_PG_PASSWORD';
    END IF;
END
\$\$;"
    _pg_psql_admin "$port" -d postgres -c "$sql" >/dev/null || die "could not create the $FASTJOIN_PG_USER role"

    # Check that password login over TCP works, as the tests will use it.
    if ! PGPASSWORD="$FASTJOIN_PG_PASSWORD" psql -X -q -w -h "$FASTJOIN_PG_HOST" -p "$port" \
        -U "$FASTJOIN_PG_USER" -d postgres -Atc 'SELECT 1' </dev/null >/dev/null; then
        die "cannot log in as $FASTJOIN_PG_USER over TCP at $FASTJOIN_PG_HOST:$port (check pg_hba.conf)"
    fi

    FASTJOIN_PG_PORT="$port"
    FASTJOIN_POSTGRES="postgresql://$FASTJOIN_PG_USER:$FASTJOIN_PG_PASSWORD@$FASTJOIN_PG_HOST:$port/postgres"
    export FASTJOIN_POSTGRES FASTJOIN_PG_HOST FASTJOIN_PG_PORT FASTJOIN_PG_USER FASTJOIN_PG_PASSWORD
    export FASTJOIN_PG_STARTED_BY_US
    log "PostgreSQL $ver/$name ready on $FASTJOIN_PG_HOST:$port (role $FASTJOIN_PG_USER) [$(fmt_duration "$t0")]"
}

# Stop the cluster again if ensure_postgres started it and FASTJOIN_STOP_POSTGRES=1.
# Safe to call more than once.
stop_postgres_if_started() {
    [[ -n "$FASTJOIN_PG_STARTED_BY_US" && "${FASTJOIN_STOP_POSTGRES:-0}" == 1 ]] || return 0
    log "stopping PostgreSQL ${FASTJOIN_PG_STARTED_BY_US} (started by this run)"
    as_root pg_ctlcluster "${FASTJOIN_PG_STARTED_BY_US%/*}" "${FASTJOIN_PG_STARTED_BY_US#*/}" stop \
        </dev/null || warn "could not stop PostgreSQL ${FASTJOIN_PG_STARTED_BY_US}"
    FASTJOIN_PG_STARTED_BY_US=""
}
