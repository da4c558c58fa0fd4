# shellcheck shell=bash
# Shared helpers for the scripts in scripts/. Source it; do not execute it.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
#
# Provides:
#   FASTJOIN_ROOT         absolute path of the repository root
#   FASTJOIN_VENVS        where the venvs live (default: $FASTJOIN_ROOT/.venvs)
#   FASTJOIN_CACHE        download/extract cache (default: $FASTJOIN_ROOT/.cache)
#   log/warn/die          concise, prefixed messages on stderr
#   synapse_version       the version pinned in patches/series
#   require_python        check that python3 from PATH is >= 3.10
#   apt_install PKG...    apt-get install, running `apt-get update` once first
#   now_s / fmt_duration  timing helpers
#   track_pid / kill_tracked  make sure background jobs never outlive us

if [[ -n "${_FASTJOIN_COMMON_SH:-}" ]]; then
    return 0
fi
_FASTJOIN_COMMON_SH=1

FASTJOIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
FASTJOIN_VENVS="${FASTJOIN_VENVS:-$FASTJOIN_ROOT/.venvs}"
FASTJOIN_CACHE="${FASTJOIN_CACHE:-$FASTJOIN_ROOT/.cache}"
export FASTJOIN_ROOT FASTJOIN_VENVS FASTJOIN_CACHE

# Name used in log prefixes: the calling script's file name.
_FASTJOIN_TAG="$(basename "${0:-fastjoin}")"

log() { printf '[%s] %s\n' "$_FASTJOIN_TAG" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$_FASTJOIN_TAG" "$*" >&2; }
die() {
    printf '[%s] ERROR: %s\n' "$_FASTJOIN_TAG" "$*" >&2
    exit 1
}

# Seconds since the epoch, with a fractional part.
now_s() { date +%s.%N; }

# fmt_duration START [END]: elapsed seconds, one decimal, e.g. "12.3s".
fmt_duration() {
    local start="$1" end="${2:-}"
    [[ -n "$end" ]] || end="$(now_s)"
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1fs", e - s }'
}

# The matrix-synapse version the patch series is written against, from the
# `# synapse-version: X.Y.Z` header line of patches/series.
synapse_version() {
    local series="$FASTJOIN_ROOT/patches/series" ver
    [[ -f "$series" ]] || die "missing $series (it must carry a '# synapse-version: X.Y.Z' header line)"
    ver="$(sed -n 's/^#[[:space:]]*synapse-version:[[:space:]]*\([^[:space:]]*\)[[:space:]]*$/\1/p' "$series" | head -n 1)"
    [[ -n "$ver" ]] || die "no '# synapse-version: X.Y.Z' line in $series"
    [[ "$ver" =~ ^[0-9]+\.[0-9]+\.[0-9]+([a-z0-9.]*)$ ]] || die "unexpected synapse-version '$ver' in $series"
    printf '%s\n' "$ver"
}

# Check that `python3` from PATH exists and is >= 3.10. Prints its version.
require_python() {
    command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH (Python >= 3.10 is required)"
    local ver
    ver="$(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" \
        || die "python3 on PATH ($(command -v python3)) does not run"
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || die "python3 on PATH ($(command -v python3)) is $ver; Python >= 3.10 is required"
    python3 -c 'import venv, ensurepip' 2>/dev/null \
        || die "python3 $ver lacks the venv/ensurepip modules (Debian: apt-get install python3-venv)"
    printf '%s\n' "$ver"
}

# Run a command as root: directly when we are root, else through sudo -n.
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

_FASTJOIN_APT_UPDATED=""
# apt_install PKG...: install Debian packages non-interactively; runs
# `apt-get update` once per process before the first install.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not available; please install: $*"
    if [[ -z "$_FASTJOIN_APT_UPDATED" ]]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >/dev/null \
            || die "apt-get update failed"
        _FASTJOIN_APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        </dev/null >/dev/null || die "apt-get install $* failed"
}

# dpkg_missing PKG...: print the packages that are not installed.
dpkg_missing() {
    local p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$p"
        fi
    done
}

# Background processes started by a script. kill_tracked ends them (and their
# process groups when they lead one); scripts call it from an EXIT trap.
_FASTJOIN_PIDS=()
track_pid() { _FASTJOIN_PIDS+=("$1"); }
kill_tracked() {
    local pid
    for pid in "${_FASTJOIN_PIDS[@]+"${_FASTJOIN_PIDS[@]}"}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for pid in "${_FASTJOIN_PIDS[@]+"${_FASTJOIN_PIDS[@]}"}"; do
        wait "$pid" 2>/dev/null || true
    done
    _FASTJOIN_PIDS=()
}

# sha256 of a list of files (names and contents); missing files are noted as such.
hash_files() {
    local f
    for f in "$@"; do
        if [[ -f "$f" ]]; then
            printf '%s %s\n' "${f#"$FASTJOIN_ROOT"/}" "$(sha256sum <"$f" | cut -d' ' -f1)"
        else
            printf '%s MISSING\n' "${f#"$FASTJOIN_ROOT"/}"
        fi
    done | sha256sum | cut -d' ' -f1
}
