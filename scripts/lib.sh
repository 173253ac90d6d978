# shellcheck shell=bash
# Helpers shared by scripts/ensure-docker and scripts/build-node-image. Source it, do not run it.

SVCREG_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SVCREG_ROOT

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}
is_root() { [ "$(id -u)" -eq 0 ]; }

# docker_works: the engine answers (bounded, so a hung daemon does not hang us).
docker_works() {
    command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}

# apt_install PKG...: install the Debian packages that are not installed yet (root only).
# Runs `apt-get update` only when apt does not know a package's candidate version.
apt_install() {
    # (No `cmd | grep -q` here: under pipefail, grep -q exiting early SIGPIPEs cmd and fails.)
    local pkg missing=() unknown=0 out
    for pkg in "$@"; do
        out=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [ "$out" = "install ok installed" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    for pkg in "${missing[@]}"; do
        out=$(apt-cache policy "$pkg" 2>/dev/null || true)
        [[ $out == *"Candidate: "[0-9]* ]] || unknown=1
    done
    if [ "$unknown" -eq 1 ]; then
        log "apt-get update"
        apt-get update -qq
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# elapsed START: seconds since START (a `date +%s.%N` value), one decimal.
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
