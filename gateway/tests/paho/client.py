"""A real paho-mqtt client for hearth's tests, driven from the command line.

    client.py PORT PROTOCOL SCENARIO

PROTOCOL is 3.1.1 or 5. Prints one JSON object with what it saw, exits 0 when
the scenario ran through, 1 otherwise (with the reason in "error").
Scenarios:
  roundtrip  subscribe to paho/#, publish QoS 1 on paho/test, receive it;
             with MQTT 5, a user property on the publish comes back.
"""

import json
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main() -> int:
    port, protocol, scenario = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    v5 = protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"paho-{protocol}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    seen = {"protocol": protocol, "messages": []}
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        seen["connack"] = str(reason_code)
        connected.set()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        seen["suback"] = [int(code.value) if hasattr(code, "value") else int(code) for code in reason_codes]
        subscribed.set()

    def on_message(client, userdata, message):
        entry = {"topic": message.topic, "payload": message.payload.decode(), "qos": message.qos}
        props = getattr(message, "properties", None)
        if props is not None and getattr(props, "UserProperty", None):
            entry["user_properties"] = [list(pair) for pair in props.UserProperty]
        seen["messages"].append(entry)
        received.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("no CONNACK")
        if scenario == "roundtrip":
            client.subscribe("paho/#", qos=1)
            if not subscribed.wait(10):
                raise RuntimeError("no SUBACK")
            properties = None
            if v5:
                properties = Properties(PacketTypes.PUBLISH)
                properties.UserProperty = ("room", "kitchen")
            info = client.publish("paho/test", "hello", qos=1, properties=properties)
            info.wait_for_publish(10)
            seen["published"] = info.is_published()
            if not received.wait(10):
                raise RuntimeError("the message did not come back")
        else:
            raise RuntimeError(f"unknown scenario {scenario}")
        client.disconnect()
        print(json.dumps(seen))
        return 0
    except Exception as error:  # reported, not raised: the test reads it
        seen["error"] = str(error)
        print(json.dumps(seen))
        return 1
    finally:
        client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
