"""The order saga's `payment` service, written without saga-core.

It speaks the wire protocol of docs/PROTOCOL.md: it consumes the commands of the `payment`
queue, runs each once per idempotency key in a transaction of its own database that also holds
its inbox record (the inbox tables of schema `payment`, as `order-saga migrate` creates them),
answers fences from that inbox, and publishes each result with publisher confirms before it
acknowledges the command. Its effects (`charge`, `refund`) go to `payment.operations` and
`example_effects` in that same transaction, as the Rust service's do.

Configured by DATABASE_URL, AMQP_URL and AMQP_PREFIX (default `saga`). Run it through the
`payment-service` script next to this file.
"""

import json
import logging
import os
import signal
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pika
import pika.exceptions
import psycopg
from psycopg.types.json import Jsonb

SERVICE = "payment"
SCHEMA = "payment"  # the service's tables and inbox, as the Rust payment service's
SCHEMA_VERSION = "2"
READABLE_VERSIONS = {"1", "2"}
UNKNOWN_COMMAND_RETRIES = 2  # attempts answered retryable before a terminal failure
CLOCK_MARGIN = timedelta(hours=1)  # the inbox purge's margin (saga-core's inbox/purge.rs)
LOCK_WAIT_MS = 5000  # how long a delivery waits for another holding its key

log = logging.getLogger("payment-service")


class Terminal(Exception):
    """A failure another attempt cannot fix: recorded, and the saga compensates."""


class Unreadable(Exception):
    """A command this service cannot read."""


def header(headers, name):
    value = (headers or {}).get(name)
    return value.decode() if isinstance(value, bytes) else value


def horizon_of(saga_id):
    """The time a purge must be after for this saga's records to be safe from it."""
    if saga_id.version != 7:
        return datetime.fromtimestamp(0, tz=timezone.utc)
    millis = saga_id.int >> 80
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc) - CLOCK_MARGIN


def too_old(saga_id):
    return (
        f"saga {saga_id} started before the inbox's latest purge: its records may have been "
        "deleted, so whether this step applied cannot be told"
    )


def decode(outcome):
    """The answer a recorded outcome gives."""
    if not isinstance(outcome, dict):
        return {"status": "failure", "error": "the inbox row has no recorded outcome", "retryable": True}
    if "ok" in outcome:
        return {"status": "success", "output": outcome["ok"]}
    if "fenced" in outcome:
        return {"status": "fenced", "detail": str(outcome["fenced"])}
    return {"status": "failure", "error": str(outcome.get("error", "recorded failure")), "retryable": False}


# The commands: each writes its effect through the command's transaction.
def effect(cur, command):
    cur.execute(
        f'INSERT INTO "{SCHEMA}".operations (saga_id, command, payload) VALUES (%s, %s, %s)',
        (uuid.UUID(command["saga_id"]), command["command"], Jsonb(command["payload"])),
    )
    cur.execute(
        "INSERT INTO example_effects (saga_id, service, action) VALUES (%s, %s, %s)",
        (uuid.UUID(command["saga_id"]), SERVICE, command["command"]),
    )
    return {"id": f'{command["command"]}-{command["saga_id"]}'}


def charge(cur, command):
    payload = command["payload"]
    if not isinstance(payload, dict) or "amount_cents" not in payload:
        raise Terminal("the input of command `charge` is not a charge (order_no, amount_cents)")
    return effect(cur, command)


def refund(cur, command):
    if not isinstance(command["payload"], dict) or "order_no" not in command["payload"]:
        raise Terminal("the input of command `refund` is not an undo (order_no, receipt)")
    return effect(cur, command)


HANDLERS = {"charge": charge, "refund": refund}


class Inbox:
    """The inbox of schema `payment`: one row per idempotency key, with its outcome."""

    def __init__(self, url):
        self.url = url
        self.conn = None

    def connection(self):
        if self.conn is None or self.conn.closed or self.conn.broken:
            # Autocommit: each `transaction()` block is one transaction, nested ones savepoints.
            self.conn = psycopg.connect(
                self.url, autocommit=True, application_name="payment-service (python)"
            )
        return self.conn

    def recorded(self, cur, key):
        cur.execute(f'SELECT outcome FROM "{SCHEMA}".inbox WHERE idempotency_key = %s', (key,))
        row = cur.fetchone()
        return None if row is None else decode(row[0])

    def record_new(self, cur, key, saga_id, command, outcome):
        """An outcome under a key nothing is recorded under; False if something is."""
        cur.execute(
            f'INSERT INTO "{SCHEMA}".inbox (idempotency_key, saga_id, command, outcome) '
            f"SELECT %s, %s, %s, %s WHERE NOT EXISTS "
            f'(SELECT 1 FROM "{SCHEMA}".inbox_purged WHERE purged_before > %s) '
            "ON CONFLICT (idempotency_key) DO NOTHING",
            (key, saga_id, command, Jsonb(outcome), horizon_of(saga_id)),
        )
        return cur.rowcount == 1

    def run(self, command):
        """Runs a command once per key; returns its outcome."""
        key, saga_id = command["idempotency_key"], uuid.UUID(command["saga_id"])
        conn = self.connection()
        handler = HANDLERS.get(command["command"])
        failure = None
        with conn.transaction() as tx, conn.cursor() as cur:
            cur.execute(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
            horizon = horizon_of(saga_id)
            if command["direction"] == "compensation":
                # A forward delivery still on its way after the compensation does nothing.
                forward = f'{saga_id}:{command["step"]}:forward'
                cur.execute(
                    f'INSERT INTO "{SCHEMA}".inbox (idempotency_key, saga_id, command, outcome) '
                    f"SELECT %s, %s, %s, %s WHERE NOT EXISTS "
                    f'(SELECT 1 FROM "{SCHEMA}".inbox_purged WHERE purged_before > %s) '
                    "ON CONFLICT (idempotency_key) DO NOTHING",
                    (forward, saga_id, command["command"], Jsonb({"fenced": "its step was compensated"}), horizon),
                )
            cur.execute(
                f'INSERT INTO "{SCHEMA}".inbox (idempotency_key, saga_id, command) '
                f"SELECT %s, %s, %s WHERE NOT EXISTS "
                f'(SELECT 1 FROM "{SCHEMA}".inbox_purged WHERE purged_before > %s) '
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (key, saga_id, command["command"], horizon),
            )
            if cur.rowcount != 1:
                outcome = self.recorded(cur, key)
                tx.force_rollback = True
                if outcome is None:
                    return {"status": "failure", "error": too_old(saga_id), "retryable": True}
                log.info("command %s already settled; answering from the inbox", key)
                return outcome
            if handler is None:
                # A new version with the handler may be rolling out: retried a while, then failed.
                failure = (
                    f"service `{SERVICE}` has no handler for command `{command['command']}` "
                    f"(this build handles: {', '.join(sorted(HANDLERS))})"
                )
                if command["attempt"] <= UNKNOWN_COMMAND_RETRIES:
                    log.error("%s; answering retryable", failure)
                    tx.force_rollback = True
                    return {"status": "failure", "error": failure, "retryable": True}
                log.error("%s; failing the step", failure)
            else:
                try:
                    with conn.transaction():  # a savepoint: a terminal failure undoes the writes
                        output = handler(cur, command)
                except Terminal as e:
                    failure = str(e)
            if failure is None:
                cur.execute(
                    f'UPDATE "{SCHEMA}".inbox SET outcome = %s WHERE idempotency_key = %s',
                    (Jsonb({"ok": output}), key),
                )
                return {"status": "success", "output": output}
            # The claim goes with the writes; the failure is recorded on its own below.
            tx.force_rollback = True
        with conn.transaction(), conn.cursor() as cur:
            if self.record_new(cur, key, saga_id, command["command"], {"error": failure}):
                return {"status": "failure", "error": failure, "retryable": False}
            outcome = self.recorded(cur, key)
            return outcome or {"status": "failure", "error": too_old(saga_id), "retryable": True}

    def fence(self, key, saga_id, command):
        """Answers whether the command under `key` applied, or stops it for good."""
        conn = self.connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
            tombstone = {"fenced": "fenced before any delivery applied it"}
            if self.record_new(cur, key, saga_id, command, tombstone):
                return {"status": "fenced", "detail": "no delivery had applied it; a tombstone now stops every later one"}
            outcome = self.recorded(cur, key)
            if outcome is None:
                return {"status": "unfenceable", "detail": too_old(saga_id)}
            if outcome["status"] == "failure" and not outcome["retryable"]:
                return {"status": "fenced", "detail": f'its failure is recorded: {outcome["error"]}'}
            return outcome


class Service:
    def __init__(self):
        self.inbox = Inbox(os.environ["DATABASE_URL"])
        self.amqp_url = os.environ["AMQP_URL"]
        prefix = os.environ.get("AMQP_PREFIX", "saga")
        self.queue = f"{prefix}.service.{SERVICE}"
        self.results = f"{prefix}.results"
        self.stopping = False
        self.channel = None

    def answer(self, headers, command_fields, outcome):
        """Publishes a result and waits for the broker's confirm."""
        saga_id = command_fields["saga_id"]
        message_id = str(uuid.uuid4())
        body = {
            "saga_id": saga_id,
            "step": int(command_fields["step"]),
            "direction": command_fields["direction"],
            "attempt": int(command_fields["attempt"]),
            "command_id": command_fields["command_id"],
            "outcome": outcome,
        }
        sid = uuid.UUID(saga_id)
        reply_headers = {
            "x-saga-message-id": message_id,
            "x-saga-id": saga_id,
            "x-saga-step": str(body["step"]),
            "x-saga-direction": body["direction"],
            "x-saga-attempt": str(body["attempt"]),
            "x-saga-command-id": body["command_id"],
            "content-type": "application/json",
            "x-saga-schema-version": SCHEMA_VERSION,
            "traceparent": f"00-{sid.hex}-{sid.bytes[8:].hex()}-01",
        }
        # Raises when the broker does not confirm it (nack, unroutable): the command goes back.
        self.channel.basic_publish(
            exchange=self.results,
            routing_key="results",
            body=json.dumps(body).encode(),
            properties=pika.BasicProperties(
                delivery_mode=2,
                content_type="application/json",
                message_id=message_id,
                headers=reply_headers,
            ),
            mandatory=True,
        )

    def on_command(self, channel, method, properties, body):
        headers = properties.headers or {}
        try:
            version = header(headers, "x-saga-schema-version")
            if version is not None and version not in READABLE_VERSIONS:
                raise Unreadable(f"unsupported schema version {version}")
            try:
                command = json.loads(body)
                for field in ("command_id", "saga_id", "step", "direction", "attempt", "command", "idempotency_key"):
                    if field not in command:
                        raise Unreadable(f"invalid command: missing field `{field}`")
            except ValueError as e:
                raise Unreadable(f"invalid command: {e}") from None
            if command.get("service") != SERVICE:
                raise Unreadable(f"the command is for service `{command.get('service')}`")
        except Unreadable as e:
            self.refuse(channel, method, headers, str(e))
            return
        try:
            outcome = self.outcome(command)
        except psycopg.Error as e:
            # The database is out of reach (a restart): the command goes back, nothing recorded.
            log.warning("the database failed (%s); handing the command back", e)
            self.inbox.conn = None
            time.sleep(0.5)
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        self.answer(headers, command, outcome)
        channel.basic_ack(method.delivery_tag)

    def outcome(self, command):
        saga_id = uuid.UUID(command["saga_id"])
        if command["direction"] == "fence":
            return self.inbox.fence(command["idempotency_key"], saga_id, command["command"])
        return self.inbox.run(command)

    def refuse(self, channel, method, headers, why):
        """Answers a command it cannot read (fencing its key, when the headers name it), then
        dead-letters it."""
        log.error("cannot read a command: %s; dead-lettering it", why)
        fields = {
            "saga_id": header(headers, "x-saga-id"),
            "step": header(headers, "x-saga-step"),
            "direction": header(headers, "x-saga-direction"),
            "attempt": header(headers, "x-saga-attempt"),
            "command_id": header(headers, "x-saga-command-id"),
        }
        if all(fields.values()):
            key, name = header(headers, "x-saga-idempotency-key"), header(headers, "x-saga-command")
            outcome = {
                "status": "failure",
                "error": f"service `{SERVICE}` cannot run this command: {why}",
                "retryable": False,
            }
            if key and name:
                try:
                    outcome = self.inbox.fence(key, uuid.UUID(fields["saga_id"]), name)
                except psycopg.Error as e:
                    log.warning("fencing an unreadable command failed: %s", e)
            self.answer(headers, fields, outcome)
        channel.basic_reject(method.delivery_tag, requeue=False)

    def serve(self):
        """Consumes until SIGTERM or SIGINT; reconnects after the broker goes away."""
        while not self.stopping:
            try:
                connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            except pika.exceptions.AMQPConnectionError as e:
                log.warning("cannot reach RabbitMQ (%s); trying again", e)
                time.sleep(1)
                continue
            try:
                self.channel = connection.channel()
                self.channel.confirm_delivery()
                self.channel.queue_declare(self.queue, passive=True)
                self.channel.basic_qos(prefetch_count=16)
                self.channel.basic_consume(self.queue, self.on_command)
                log.info("serving %s", self.queue)
                while not self.stopping:
                    connection.process_data_events(time_limit=0.5)
                connection.close()
            except (pika.exceptions.AMQPError, OSError) as e:
                log.warning("lost RabbitMQ (%r); reconnecting", e)
                try:
                    connection.close()
                except Exception:
                    pass
                time.sleep(0.5)


def main():
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s payment-service: %(message)s",
        stream=sys.stderr,
    )
    for name in ("DATABASE_URL", "AMQP_URL"):
        if not os.environ.get(name):
            sys.exit(f"payment-service: {name} is not set")
    if os.environ.get("SAGA_PAYLOAD_KEYS"):
        sys.exit("payment-service: SAGA_PAYLOAD_KEYS is set, and this service cannot decrypt payloads")
    service = Service()

    def stop(signum, _frame):
        service.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.serve()


if __name__ == "__main__":
    main()
