#!/usr/bin/env bash
# Runs hearth live on this machine: the gateway with its own nats-server
# (JetStream data in .data/ of this checkout), MQTT on port 1883, /healthz on
# 127.0.0.1:9880. Installs what is missing first (scripts/setup.sh) and
# builds in release mode. Stop it with Ctrl-C: the gateway stores what it
# was handed, then stops its nats-server.
#
# Usage: scripts/run.sh [GATEWAY OPTIONS...]   (see: scripts/run.sh --help)
#   e.g. scripts/run.sh --mqtt-listen 127.0.0.1:1884 --encoding protobuf
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if ! command -v nats-server >/dev/null 2>&1 && [ -z "${HEARTH_NATS_SERVER:-}" ]; then
    scripts/setup.sh
fi
# Debian's nats-server lives in /usr/sbin, which is not on every user's PATH.
if [ -z "${HEARTH_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null 2>&1; then
    for candidate in /usr/sbin/nats-server "$repo/.tools/venv/bin/nats-server"; do
        if [ -x "$candidate" ]; then
            export HEARTH_NATS_SERVER="$candidate"
            break
        fi
    done
fi

cargo build --release -p hearth-gateway
export HEARTH_DATA_DIR="${HEARTH_DATA_DIR:-$repo/.data}"

cat <<'HINT'
hearth is starting. Try, in another terminal:
  mosquitto_pub -t hearth/home/kitchen/pir-1/motion -q 1 -m '{"detected":true}'
  mosquitto_pub -t 'zigbee2mqtt/Living Room/Lamp' -q 1 -m '{"state":"ON","brightness":128}'
  curl -s 127.0.0.1:9880/healthz
and, with the NATS CLI:  nats stream ls;  nats sub 'hearth.evt.>'
HINT
exec target/release/hearth-gateway "$@"
