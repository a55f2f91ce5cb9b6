#!/usr/bin/env bash
# Runs hearth live on this machine: the gateway with its own nats-server
# (JetStream data in .data/ of this checkout), MQTT on port 1883, /healthz on
# 127.0.0.1:9880, and every house rule (hearth-consumers all: lights,
# security, notify, view, with deploy/homes.toml or $HEARTH_HOMES). Installs what is missing first
# (scripts/setup.sh) and builds in release mode. Stop it with Ctrl-C: the
# rules finish the event in hand, the gateway stores what it was handed,
# then stops its nats-server.
#
# Usage: scripts/run.sh [--demo] [GATEWAY OPTIONS...]   (see: scripts/run.sh --help)
#   e.g. scripts/run.sh --mqtt-listen 127.0.0.1:1884 --encoding protobuf
#   --demo: simulated homes live in it too (hearth-sim, a normal day at 60
#   times real time, $HEARTH_DEMO_HOMES homes, default 3), the rules
#   following the simulator's homes file instead of deploy/homes.toml.
set -euo pipefail

demo=""
if [ "${1:-}" = "--demo" ]; then
    demo=1
    shift
fi

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

cargo build --release -p hearth-gateway -p hearth-consumers ${demo:+-p hearth-sim}
export HEARTH_DATA_DIR="${HEARTH_DATA_DIR:-$repo/.data}"
demo_args=(--homes "${HEARTH_DEMO_HOMES:-3}" --speed 60)
if [ -n "$demo" ]; then
    mkdir -p "$HEARTH_DATA_DIR"
    target/release/hearth-sim "${demo_args[@]}" --write-homes "$HEARTH_DATA_DIR/demo-homes.toml" --only-write-homes
    export HEARTH_HOMES="$HEARTH_DATA_DIR/demo-homes.toml"
fi

# Debian's nats-server package runs its own server on 4222; hearth's then
# takes the next free port rather than failing.
nats_port=4222
if [ -z "${HEARTH_NATS_URL:-}" ] && [ -z "${HEARTH_EMBEDDED_NATS_LISTEN:-}" ]; then
    while (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null; do
        nats_port=$((nats_port + 1))
    done
    if [ "$nats_port" != 4222 ]; then
        echo "run.sh: port 4222 is taken (Debian's nats-server service?); hearth's nats-server uses $nats_port"
        export HEARTH_EMBEDDED_NATS_LISTEN="127.0.0.1:$nats_port"
    fi
fi

cat <<'HINT'
hearth is starting. Try, in another terminal:
  mosquitto_sub -t 'hearth/home/+/+/set' -v &    # the lights' commands
  mosquitto_pub -t hearth/home/kitchen/pir-1/motion -q 1 -m '{"detected":true}'
  mosquitto_sub -t 'hearth/home/alarm/#' -v &    # the alarm panel's state and answers
  mosquitto_pub -t hearth/home/alarm/set -q 1 -m '{"action":"arm_away","code":"1234"}'
  mosquitto_pub -t 'zigbee2mqtt/Living Room/Lamp' -q 1 -m '{"state":"ON","brightness":128}'
  curl -s 127.0.0.1:9880/healthz
HINT
echo "and, with the NATS CLI:  nats -s nats://127.0.0.1:$nats_port stream ls;  nats -s nats://127.0.0.1:$nats_port sub 'hearth.evt.>'"
# Anonymous MQTT clients are let in unless a password file is given (see the
# README, "Authentication").
if [ -z "${HEARTH_PASSWORD_FILE:-}" ] && [[ " $* " != *" --password-file"* ]]; then
    echo "run.sh: anonymous MQTT clients are allowed; for passwords see README, Authentication"
    export HEARTH_ALLOW_ANONYMOUS=true
fi
nats_url="${HEARTH_NATS_URL:-nats://127.0.0.1:$nats_port}"
export HEARTH_HOMES="${HEARTH_HOMES:-$repo/deploy/homes.toml}"

target/release/hearth-gateway "$@" &
gateway=$!
rules=""
sim=""
stop() {
    [ -n "$sim" ] && kill -INT "$sim" 2>/dev/null && wait "$sim" 2>/dev/null
    [ -n "$rules" ] && kill -TERM "$rules" 2>/dev/null && wait "$rules" 2>/dev/null
    kill -TERM "$gateway" 2>/dev/null
    wait "$gateway" 2>/dev/null
}
trap stop INT TERM
# The rules start once the gateway's NATS answers (they wait for its streams
# themselves).
host_port=${nats_url#nats://}
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${host_port%%:*}/${host_port##*:}") 2>/dev/null && break
    kill -0 "$gateway" 2>/dev/null || exit 1
    sleep 0.2
done
echo "run.sh: house rules: all (homes file $HEARTH_HOMES)"
target/release/hearth-consumers --nats-url "$nats_url" all &
rules=$!
if [ -n "$demo" ]; then
    echo "run.sh: simulated homes (hearth-sim ${demo_args[*]}, a normal day; --help for more)"
    # Its MQTT address: the gateway's, when given as --mqtt-listen.
    mqtt="127.0.0.1:1883"
    args=("$@")
    for i in "${!args[@]}"; do
        [ "${args[$i]}" = "--mqtt-listen" ] && mqtt="${args[$((i + 1))]:-$mqtt}"
    done
    sleep 2
    target/release/hearth-sim "${demo_args[@]}" --duration 365days --nats-url "$nats_url" \
        --mqtt-url "mqtt://${mqtt/0.0.0.0/127.0.0.1}" &
    sim=$!
fi
wait "$gateway"
