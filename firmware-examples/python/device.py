#!/usr/bin/env python3
"""An example Tellus device in Python with Eclipse Paho (paho-mqtt 2.x, or 1.x).

It connects to Tellus over MQTT 3.1.1 with mutual TLS (its own certificate and key; the
client id is the device id), sends a pretend sensor reading as JSON telemetry every --every
seconds at QoS 1, and answers commands:

  devices/{id}/telemetry                     <- {"ts": ms, "values": {"temperature": ..., "uptime_s": ...}}
  devices/{id}/commands/{command_id}         -> {"id", "name", "params", "expires_at_ms"}
  devices/{id}/commands/{command_id}/result  <- {"ok": true|false, "output": ...}

"ping" is answered {"ok": true, "output": {"pong": <params, or true without params>}}, any
other command {"ok": false, "output": "unknown command \\"<name>\\""}.

Paho's network thread (loop_start) connects, reconnects with a growing delay, and calls the
on_* callbacks; the main thread takes the readings. Each event is one line on stdout; errors
go to stderr. See README.md to run it.
"""

import argparse
import collections
import json
import signal
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt

# How many handled commands are remembered, to answer a repeated one without acting twice.
HANDLED_MAX = 64
# The largest command result sent, in bytes (Tellus takes packets of up to 256 KiB).
RESULT_MAX = 64 * 1024
# Readings sent but not yet acknowledged; while this many are, no new reading is taken.
PENDING_MAX = 8
KEEPALIVE_S = 30


def say(line):
    print(line, flush=True)


def complain(line):
    print(f"device.py: {line}", file=sys.stderr, flush=True)


def new_client(client_id):
    """A client for MQTT 3.1.1 with a clean session: subscriptions are made on each connect."""
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x
        return mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
    return mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)


def connack_failed(rc):
    """Whether a CONNACK code is a refusal: a ReasonCode in 2.x, an int in 1.x."""
    return rc.is_failure if hasattr(rc, "is_failure") else rc != 0


def suback_failed(granted):
    """Whether a SUBACK refused the (one) subscription: ReasonCodes in 2.x, QoS ints in 1.x."""
    if not granted:
        return True
    rc = granted[0]
    return rc.is_failure if hasattr(rc, "is_failure") else rc == 0x80


def run_command(name, params):
    """What the device does with a command, as its result. This is where a real device acts."""
    if name == "ping":
        return {"ok": True, "output": {"pong": True if params is None else params}}
    return {"ok": False, "output": f'unknown command "{name}"'}


class Device:
    def __init__(self, args):
        self.args = args
        self.telemetry_topic = f"devices/{args.id}/telemetry"
        self.commands_prefix = f"devices/{args.id}/commands/"
        self.commands_filter = self.commands_prefix + "+"
        # Set and cleared by the network thread, read by the main one.
        self.connected = threading.Event()
        self.stop = threading.Event()
        # Command id -> its result (JSON text), oldest first; only the network thread uses it.
        self.handled = collections.OrderedDict()

    # 2.x: (client, userdata, flags, reason_code, properties); 1.x: (client, userdata, flags, rc)
    def on_connect(self, client, _userdata, _flags, rc, _properties=None):
        if connack_failed(rc):
            # Refused, e.g. an unknown, disabled or revoked device; paho tries again later.
            text = str(rc) if hasattr(rc, "is_failure") else mqtt.connack_string(rc)
            complain(f"connection refused: {text}")
            return
        say(f"connected to {self.args.host}:{self.args.port} as {self.args.id}")
        # QoS 1, so that our PUBACK tells Tellus the command was delivered. Commands queued
        # while we were away arrive now.
        rc, _mid = client.subscribe(self.commands_filter, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            complain(f"subscribe to {self.commands_filter} failed: {mqtt.error_string(rc)}")
        self.connected.set()

    # 2.x: (client, userdata, mid, reason_codes, properties); 1.x: (client, userdata, mid, granted_qos)
    def on_subscribe(self, _client, _userdata, _mid, granted, _properties=None):
        if suback_failed(granted):
            complain(f"subscription to {self.commands_filter} refused")
            return
        qos = getattr(granted[0], "value", granted[0])  # a ReasonCode in 2.x, an int in 1.x
        say(f"subscribed to {self.commands_filter} (QoS {qos})")

    # 2.x: (client, userdata, disconnect_flags, reason_code, properties); 1.x: (client, userdata, rc)
    def on_disconnect(self, _client, _userdata, *args):
        rc = args[1] if len(args) >= 2 else args[0]
        self.connected.clear()
        if not self.stop.is_set():
            complain(f"connection lost ({rc}); paho reconnects")

    def on_message(self, client, _userdata, msg):
        command_id = msg.topic[len(self.commands_prefix):]
        if not msg.topic.startswith(self.commands_prefix) or not command_id or "/" in command_id:
            complain(f"message on unexpected topic {msg.topic} ignored")
            return
        result_topic = f"{msg.topic}/result"

        # Tellus may send a command again if our acknowledgement was lost: answer it again,
        # but act only once.
        if command_id in self.handled:
            self.publish_result(client, command_id, result_topic, self.handled[command_id])
            say(f"command {command_id} repeated: result sent again")
            return

        try:
            command = json.loads(msg.payload)
            if not isinstance(command, dict) or not isinstance(command.get("name"), str):
                raise ValueError("no name")
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            name, result = "malformed", {"ok": False, "output": f"malformed command: {e}"}
        else:
            if command.get("id", command_id) != command_id:
                complain(f"command {command_id}: its payload says id {command['id']}; the topic's id is used")
            name = command["name"]
            result = run_command(name, command.get("params"))

        payload = json.dumps(result, separators=(",", ":"))
        if len(payload) > RESULT_MAX:
            # Too large to send: a result Tellus refused would be sent again after every
            # reconnect. Say why instead.
            payload = json.dumps(
                {"ok": False, "output": f"the result is {len(payload)} bytes; at most {RESULT_MAX} are sent"},
                separators=(",", ":"),
            )
        self.handled[command_id] = payload
        if len(self.handled) > HANDLED_MAX:
            self.handled.popitem(last=False)  # forget the oldest
        self.publish_result(client, command_id, result_topic, payload)
        say(f"command {command_id} ({name}) answered: {payload}")

    @staticmethod
    def publish_result(client, command_id, topic, payload):
        # QoS 1: Tellus acknowledges a result once it has recorded it; paho sends it again
        # after a reconnect until then.
        info = client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            complain(f"command {command_id}: result not sent: {mqtt.error_string(info.rc)}")

    def take_readings(self, client):
        """The main thread: a reading every --every seconds while connected, --count of them
        (0: forever), then only commands until stopped. This example keeps no backlog: a real
        device would store readings taken while offline and send them later, each with its
        own time."""
        started = time.monotonic()
        next_at = started
        sent = 0
        pending = collections.OrderedDict()  # reading number -> paho's MQTTMessageInfo
        while not self.stop.is_set():
            # A PUBACK for a reading: Tellus has stored it on disk.
            for n, info in list(pending.items()):
                if info.is_published():
                    del pending[n]
                    say(f"reading {n} acknowledged")
            now = time.monotonic()
            wanted = self.args.count == 0 or sent < self.args.count
            if wanted and self.connected.is_set() and len(pending) < PENDING_MAX and now >= next_at:
                n = sent + 1
                # A pretend sensor. "ts" is the device's own time (ms since the epoch): if a
                # PUBACK is lost and the reading sent again, Tellus stores it once, at this time.
                reading = {
                    "ts": int(time.time() * 1000),
                    "values": {"temperature": 20.0 + (n % 10) * 0.5, "uptime_s": int(now - started)},
                }
                info = client.publish(self.telemetry_topic, json.dumps(reading), qos=1)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    pending[n] = info
                else:
                    # The connection broke as we sent it. Paho keeps a QoS 1 message and
                    # sends it after reconnecting, but we do not wait for its PUBACK.
                    complain(f"reading {n}: {mqtt.error_string(info.rc)} (it may still be sent after reconnecting)")
                sent = n
                next_at = max(next_at + self.args.every, now)  # fell behind: no burst
            # Short naps, so that acknowledgements are reported soon after they arrive.
            self.stop.wait(0.05)


def positive_seconds(text):
    value = float(text)
    if not 0.001 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"seconds from 0.001 to 86400, not {text}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True, help="the fleet CA certificate (PEM)")
    parser.add_argument("--cert", required=True, help="the device certificate (PEM)")
    parser.add_argument("--key", required=True, help="the device private key (PEM)")
    parser.add_argument("--id", required=True, help="the device id, used as client id")
    parser.add_argument("--every", type=positive_seconds, default=5.0, help="seconds between readings (default 5)")
    parser.add_argument("--count", type=int, default=0, help="readings to send, then only answer commands (default 0: forever)")
    args = parser.parse_args()
    if args.count < 0:
        parser.error("--count must be 0 or more")

    device = Device(args)
    client = new_client(args.id)
    client.on_connect = device.on_connect
    client.on_subscribe = device.on_subscribe
    client.on_disconnect = device.on_disconnect
    client.on_message = device.on_message
    # Wait 1 s before reconnecting, twice as long after each failure, at most 30 s.
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    try:
        # Mutual TLS: Tellus's server certificate is checked against the fleet CA (and its
        # name against --host); ours proves who we are.
        client.tls_set(
            ca_certs=args.cafile,
            certfile=args.cert,
            keyfile=args.key,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    except (OSError, ssl.SSLError) as e:
        complain(f"cannot load the TLS files: {e}")
        sys.exit(1)

    # SIGINT and SIGTERM end the program cleanly.
    signal.signal(signal.SIGINT, lambda *_: device.stop.set())
    signal.signal(signal.SIGTERM, lambda *_: device.stop.set())

    # connect_async: the network thread connects, and keeps trying until it can.
    client.connect_async(args.host, args.port, keepalive=KEEPALIVE_S)
    client.loop_start()
    try:
        device.take_readings(client)
    finally:
        say("stopping")
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    main()
