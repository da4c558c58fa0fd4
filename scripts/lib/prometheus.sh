# shellcheck shell=bash
# Prometheus for the metrics tests. Source it (after common.sh), or run it:
#
#   scripts/lib/prometheus.sh ensure
#       make sure Debian's `prometheus` is installed (installs it if not);
#       prints the path of the binary.
#   scripts/lib/prometheus.sh run DIR PORT TARGET [TARGET...]
#       write DIR/prometheus.yml (scrape every second: each TARGET, host:port,
#       path /_synapse/metrics) and exec Prometheus in the foreground, listening
#       on 127.0.0.1:PORT only, its data in DIR/data. The caller owns the
#       process (it is this script's pid) and stops it with SIGTERM.
#
# Sourced, it provides:
#   ensure_prometheus   as `ensure`, and exports FASTJOIN_PROMETHEUS (the binary).
#     Installing never starts Debian's own prometheus service: the package is
#     installed with service starts denied (policy-rc.d), and the system-wide
#     service is left alone; the tests only ever run their own instance.
#   prometheus_config DIR TARGET...   writes DIR/prometheus.yml
#
# Works as root with no stdin; as another user it needs password-less sudo.

if [[ -n "${_FASTJOIN_PROMETHEUS_SH:-}" ]]; then
    return 0 2>/dev/null || true
fi
_FASTJOIN_PROMETHEUS_SH=1

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

_prom_binary() {
    local p
    p="$(command -v prometheus 2>/dev/null || true)"
    [[ -n "$p" ]] || { [[ -x /usr/bin/prometheus ]] && p=/usr/bin/prometheus; }
    printf '%s\n' "$p"
}

ensure_prometheus() {
    local t0 bin policy=/usr/sbin/policy-rc.d ours=0
    t0="$(now_s)"
    bin="$(_prom_binary)"
    if [[ -z "$bin" ]]; then
        log "no prometheus installed; installing Debian's prometheus (its service is not started)"
        # Deny service starts for the duration of the install, unless a policy
        # is already in place (containers usually have one).
        if [[ ! -e "$policy" ]]; then
            printf '#!/bin/sh\n# synapse-fastjoin: installing prometheus, no service starts\nexit 101\n' \
                | as_root tee "$policy" >/dev/null
            as_root chmod 755 "$policy"
            ours=1
        fi
        (apt_install prometheus) || true
        if [[ "$ours" == 1 ]]; then
            as_root rm -f "$policy"
        fi
        bin="$(_prom_binary)"
        [[ -n "$bin" ]] || die "prometheus could not be installed (apt-get install prometheus)"
    fi
    FASTJOIN_PROMETHEUS="$bin"
    export FASTJOIN_PROMETHEUS
    log "prometheus ready: $("$bin" --version 2>&1 | head -n 1) [$(fmt_duration "$t0")]"
}

# prometheus_config DIR TARGET...: a config scraping Synapse's metrics
# listener(s) every second.
prometheus_config() {
    local dir="$1" t
    shift
    mkdir -p "$dir"
    {
        echo "global:"
        echo "  scrape_interval: 1s"
        echo "  scrape_timeout: 1s"
        echo "  evaluation_interval: 1s"
        echo "scrape_configs:"
        echo "  - job_name: synapse"
        echo "    metrics_path: /_synapse/metrics"
        echo "    static_configs:"
        echo "      - targets:"
        for t in "$@"; do
            echo "          - '$t'"
        done
    } >"$dir/prometheus.yml"
}

_prometheus_main() {
    case "${1:-}" in
        ensure)
            ensure_prometheus
            printf '%s\n' "$FASTJOIN_PROMETHEUS"
            ;;
        run)
            [[ $# -ge 4 ]] || die "usage: $0 run DIR PORT TARGET [TARGET...]"
            local dir="$2" port="$3" bin
            shift 3
            [[ "$port" =~ ^[0-9]+$ ]] || die "bad port: $port"
            bin="$(_prom_binary)"
            [[ -n "$bin" ]] || die "prometheus is not installed (run: $0 ensure)"
            prometheus_config "$dir" "$@"
            mkdir -p "$dir/data"
            exec "$bin" \
                --config.file="$dir/prometheus.yml" \
                --storage.tsdb.path="$dir/data" \
                --web.listen-address="127.0.0.1:$port" \
                --storage.tsdb.retention.time=1d \
                --log.level=warn
            ;;
        *)
            die "usage: $0 ensure | run DIR PORT TARGET [TARGET...]"
            ;;
    esac
}

# Executed rather than sourced: act on the arguments.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    _prometheus_main "$@"
fi
