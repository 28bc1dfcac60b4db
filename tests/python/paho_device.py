#!/usr/bin/env python3
"""A Tellus device written with Eclipse Paho (paho-mqtt 2.x, or 1.x).

Connects over mTLS with MQTT 3.1.1 or 5 (--protocol; client id = device id), publishes one
message, waits for the broker's acknowledgement and exits 0. Any failure prints one line on stderr and
exits non-zero:

  3  the broker refused the connection (a CONNACK with an error code)
  4  TLS or network failure, or the connection closed before the acknowledgement
  5  no answer within --timeout

The end-to-end tests run it (tests/tests/edge.rs); it also works by hand:

  python3 tests/python/paho_device.py --host 127.0.0.1 --port 8883 --cafile certs/ca.crt \
      --cert certs/sensor-01.crt --key certs/sensor-01.key --id sensor-01 \
      --topic devices/sensor-01/telemetry --message '{"temperature": 21.5}' --qos 1
"""

import argparse
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt

REFUSED, NETWORK, TIMEOUT = 3, 4, 5


def fail(code, message):
    print(f"paho_device: {message}", file=sys.stderr)
    sys.exit(code)


def new_client(client_id, protocol):
    # MQTT 5 has clean start, given to connect(), instead of a clean session.
    session = {} if protocol == mqtt.MQTTv5 else {"clean_session": True}
    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x
        return mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            **session,
        )
    return mqtt.Client(client_id=client_id, protocol=protocol, **session)


def connack_failed(rc):
    """Whether a CONNACK code is a refusal: a ReasonCode in 2.x, an int in 1.x."""
    return rc.is_failure if hasattr(rc, "is_failure") else rc != 0


def connack_text(rc):
    return str(rc) if hasattr(rc, "is_failure") else mqtt.connack_string(rc)


class Session:
    """What the network thread has seen, for the main thread to wait on."""

    def __init__(self):
        self.changed = threading.Condition()
        self.connected = False
        self.refused = None
        self.closed = None

    # 2.x: (client, userdata, flags, reason_code, properties); 1.x: (client, userdata, flags, rc)
    def on_connect(self, _client, _userdata, _flags, rc, _properties=None):
        with self.changed:
            if connack_failed(rc):
                self.refused = connack_text(rc)
            else:
                self.connected = True
            self.changed.notify_all()

    # 2.x: (client, userdata, disconnect_flags, reason_code, properties); 1.x: (client, userdata, rc)
    def on_disconnect(self, _client, _userdata, *args):
        rc = args[1] if len(args) >= 2 else args[0]
        with self.changed:
            self.closed = str(rc)
            self.changed.notify_all()

    def wait(self, ready, deadline):
        with self.changed:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True, help="the fleet CA certificate (PEM)")
    parser.add_argument("--cert", required=True, help="the device certificate (PEM)")
    parser.add_argument("--key", required=True, help="the device private key (PEM)")
    parser.add_argument("--id", required=True, help="the device id, used as client id")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--message", required=True)
    parser.add_argument("--qos", type=int, choices=[0, 1, 2], default=1)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds for each step")
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    args = parser.parse_args()
    protocol = mqtt.MQTTv5 if args.protocol == "5" else mqtt.MQTTv311

    session = Session()
    client = new_client(args.id, protocol)
    client.on_connect = session.on_connect
    client.on_disconnect = session.on_disconnect
    # A refused or failed connection is reported once, not retried.
    client.reconnect_delay_set(min_delay=3600, max_delay=3600)
    try:
        client.tls_set(
            ca_certs=args.cafile,
            certfile=args.cert,
            keyfile=args.key,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    except (OSError, ssl.SSLError) as e:
        fail(NETWORK, f"cannot load the TLS files: {e}")

    try:
        # TCP and the TLS handshake happen here.
        if protocol == mqtt.MQTTv5:
            client.connect(args.host, args.port, keepalive=30, clean_start=True)
        else:
            client.connect(args.host, args.port, keepalive=30)
    except (OSError, ssl.SSLError) as e:
        fail(NETWORK, f"cannot connect to {args.host}:{args.port}: {e}")
    client.loop_start()
    try:
        deadline = time.monotonic() + args.timeout
        session.wait(lambda: session.connected or session.refused or session.closed, deadline)
        if session.refused:
            fail(REFUSED, f"connection refused by the broker: {session.refused}")
        if session.closed and not session.connected:
            fail(NETWORK, f"connection closed before CONNACK: {session.closed}")
        if not session.connected:
            fail(TIMEOUT, f"no CONNACK within {args.timeout}s")

        info = client.publish(args.topic, args.message.encode(), qos=args.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            fail(NETWORK, f"publish not sent: {mqtt.error_string(info.rc)}")
        # wait_for_publish returns at its timeout whether or not the connection is alive, so
        # wait in short steps and give up as soon as the connection closes.
        deadline = time.monotonic() + args.timeout
        while not info.is_published():
            if session.closed:
                fail(NETWORK, f"connection closed before the acknowledgement: {session.closed}")
            if time.monotonic() >= deadline:
                fail(TIMEOUT, f"no acknowledgement within {args.timeout}s")
            try:
                info.wait_for_publish(timeout=0.1)
            except (RuntimeError, ValueError) as e:  # 2.x: the message can no longer be sent
                fail(NETWORK, f"publish failed: {e}")
        client.disconnect()
    finally:
        client.loop_stop()
    print(
        f"paho_device: {args.id} published to {args.topic} over MQTT {args.protocol} "
        f"(QoS {args.qos}), acknowledged"
    )


if __name__ == "__main__":
    main()
