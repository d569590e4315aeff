#!/usr/bin/env python3
"""loyalty: a saga participant in Python, written from docs/protocol.md alone.

Actions: `grant` (forward: max(1, amount_cents // 100) points to the order's
customer) and `revoke` (its compensation). The customer `blocked` is refused
(`rejected: customer_blocked`), so a saga can be seen compensating.

What the protocol asks, and where it is done here:
- commands on `saga.cmd.loyalty.*` in the queue group `loyalty`; admin
  (`stats`, paged `effects`) on `saga.admin.loyalty.>` with no queue group;
- every command is checked (`parse_command`) before anything is applied: a bad
  envelope is answered `error`, a bad order `rejected: invalid_payload`, and
  neither stores anything;
- one stored reply per idempotency key: a repeat gets it again; the effect and
  its reply are ONE SQLite transaction, committed (fsync) before the reply is
  published; a compensation that comes first stores a tombstone under the
  forward key, so the late forward is `rejected: compensated_before_forward`;
- it connects as the NATS user `participant-loyalty` (nkey seed file) with the
  inbox prefix `_INBOX_loyalty`, and publishes nothing but replies.

Run: python loyalty.py --data-dir ./data/loyalty --nats-nkey ./data/nats-auth/participant-loyalty.nk
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import time
import unicodedata

import nats

NAME = "loyalty"
ACTIONS = {"grant": "forward", "revoke": "compensate"}
TOMBSTONE = {"outcome": "rejected", "reason": "compensated_before_forward"}
MAX_COMMAND_BYTES = 64 * 1024  # an order is at most ~30 KiB; anything bigger is not a command
PAGE_DEFAULT, PAGE_MAX, PAGE_BYTES = 500, 1000, 512 * 1024
U32, I64 = 2**32 - 1, 2**63 - 1

log = logging.getLogger(NAME)


class Refused(Exception):
    """A command refused before its handler runs: answered, nothing stored."""

    def __init__(self, outcome, reason):
        super().__init__(reason)
        self.reply = {"outcome": outcome, "reason": reason}


def malformed(reason):
    return Refused("error", reason)


# --- validation: the rules of saga-wire's validate module -------------------

def check_name(field, v):
    ok = 0 < len(v) <= 64 and "a" <= v[0] <= "z" and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-_" for c in v)
    if not ok:
        raise malformed(f"invalid command: {field}: must be 1-64 lower-case letters, digits, `-` or `_`, starting with a letter")


def check_saga_id(v):
    hexdigits = "0123456789abcdef"
    ok = len(v) == 36 and all((c == "-") if i in (8, 13, 18, 23) else (c in hexdigits) for i, c in enumerate(v))
    if not ok:
        raise malformed("invalid command: saga_id: must be a UUID in canonical lower-case hyphenated form")


def check_text(field, v, max_chars):
    """Ids and SKUs: 1..max_chars, no surrounding space, no Cc/Cf/U+2028/U+2029."""
    bad = None
    if not v:
        bad = "must not be empty"
    elif len(v) > max_chars:
        bad = f"must be at most {max_chars} characters"
    elif v.strip() != v:
        bad = "must not start or end with whitespace"
    elif any(unicodedata.category(c) in ("Cc", "Cf") or c in "\u2028\u2029" for c in v):
        bad = "must not contain control or format characters"
    if bad:
        raise Refused("rejected", f"invalid_payload: payload.{field}: {bad}")


def expect(obj, fields, where):
    """The exact JSON shape: these fields (name -> type, None = any), no others."""
    if not isinstance(obj, dict):
        raise malformed(f"malformed command: {where} must be an object")
    for k in obj:
        if k not in fields:
            raise malformed(f"malformed command: unknown field `{k}` in {where}")
    for k, t in fields.items():
        if k not in obj:
            if k != "input":
                raise malformed(f"malformed command: missing field `{k}` in {where}")
            continue
        v = obj[k]
        if t is int and (not isinstance(v, int) or isinstance(v, bool)):
            raise malformed(f"malformed command: `{k}` must be an integer")
        if t is not None and t is not int and not isinstance(v, t):
            raise malformed(f"malformed command: `{k}` must be a {t.__name__}")


def no_constants(name):
    raise ValueError(f"{name} is not JSON")


def parse_command(subject, body):
    """The command as a dict, or Refused."""
    if len(body) > MAX_COMMAND_BYTES:
        raise malformed(f"malformed command: {len(body)} bytes, at most {MAX_COMMAND_BYTES}")
    try:
        cmd = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise malformed(f"malformed command: {e}")
    expect(cmd, {"saga_id": str, "definition": str, "step": str, "action": str, "kind": str,
                 "attempt": int, "idempotency_key": str, "payload": dict, "input": None}, "the command")
    if cmd["kind"] not in ("forward", "compensate"):
        raise malformed("malformed command: `kind` must be `forward` or `compensate`")
    if not 0 <= cmd["attempt"] <= U32:
        raise malformed("malformed command: `attempt` out of range")
    p = cmd["payload"]
    expect(p, {"order_id": str, "customer_id": str, "items": list, "amount_cents": int, "currency": str}, "payload")
    if not -I64 - 1 <= p["amount_cents"] <= I64:
        raise malformed("malformed command: `amount_cents` out of range")
    for item in p["items"]:
        expect(item, {"sku": str, "quantity": int}, "an item")
        if not 0 <= item["quantity"] <= U32:
            raise malformed("malformed command: `quantity` out of range")

    token = subject.rsplit(".", 1)[-1]
    if token != cmd["action"]:
        raise malformed(f"subject action `{token}` does not match `{cmd['action']}`")
    if token not in ACTIONS:
        raise malformed(f"unknown action `{token}`")
    if ACTIONS[token] != cmd["kind"]:
        raise malformed(f"`{token}` is not a {cmd['kind']} action here")

    check_saga_id(cmd["saga_id"])
    name, _, version = cmd["definition"].partition("@")
    check_name("definition", name)
    if not (version.isascii() and version.isdigit() and len(version) <= 10 and 1 <= int(version) <= U32):
        raise malformed("invalid command: definition: must be `<name>@<version>`")
    check_name("step", cmd["step"])
    check_name("action", cmd["action"])
    if cmd["attempt"] < 1:
        raise malformed("invalid command: attempt: must be at least 1")
    key = f"{cmd['saga_id']}/{cmd['step']}/{cmd['kind']}"
    if cmd["idempotency_key"] != key:
        raise malformed(f"invalid command: idempotency_key: must be `{key}`")
    if cmd.get("input") is not None and not isinstance(cmd["input"], dict):
        raise malformed("invalid command: input: must be an object when present")

    if cmd["kind"] == "forward":  # a compensation's order is judged by its shape only
        check_text("order_id", p["order_id"], 128)
        check_text("customer_id", p["customer_id"], 128)
        if not 1 <= len(p["items"]) <= 100:
            raise Refused("rejected", "invalid_payload: payload.items: 1 to 100 items")
        for i, item in enumerate(p["items"]):
            check_text(f"items[{i}].sku", item["sku"], 64)
            if not 1 <= item["quantity"] <= 1000:
                raise Refused("rejected", f"invalid_payload: payload.items[{i}].quantity: must be 1 to 1000")
        if not 1 <= p["amount_cents"] <= 100_000_000:
            raise Refused("rejected", "invalid_payload: payload.amount_cents: must be 1 to 100000000")
        c = p["currency"]
        if not (len(c) == 3 and all("A" <= ch <= "Z" for ch in c)):
            raise Refused("rejected", "invalid_payload: payload.currency: must be a 3-letter upper-case ISO 4217 code")
    return cmd


# --- the store: SQLite, one transaction per command --------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, stored_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS grants (saga_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, points INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 1), grants INTEGER NOT NULL,
    revokes INTEGER NOT NULL, points_granted INTEGER NOT NULL, points_revoked INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0, 0);
"""
FORMAT_VERSION = 1  # PRAGMA user_version: the layout above


class Loyalty:
    def __init__(self, data_dir, blocked):
        os.makedirs(data_dir, exist_ok=True)
        # isolation_level=None: no implicit transactions, each command says BEGIN/COMMIT itself.
        self.db = sqlite3.connect(os.path.join(data_dir, "loyalty.sqlite3"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk when it returns
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, FORMAT_VERSION):
            raise SystemExit(f"loyalty.sqlite3 has format {version}, this program knows {FORMAT_VERSION}")
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        self.blocked = blocked
        self.commands = self.dedupe_hits = 0

    def handle(self, subject, body):
        """The reply to one command; stored (with its effect) before it is returned."""
        self.commands += 1
        try:
            cmd = parse_command(subject, body)
        except Refused as r:
            return r.reply, None
        key = cmd["idempotency_key"]
        try:
            self.db.execute("BEGIN IMMEDIATE")  # the check and the write are one atomic step
            try:
                stored = self.stored(key)
                if stored is not None:
                    self.dedupe_hits += 1
                    reply = stored
                else:
                    reply = self.grant(cmd) if cmd["kind"] == "forward" else self.revoke(cmd)
                    self.store(key, reply)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:  # nothing applied, nothing stored: the coordinator retries
            return {"outcome": "error", "reason": f"storage: {e}"}, cmd
        return reply, cmd

    def stored(self, key):
        row = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def store(self, key, reply):
        self.db.execute("INSERT INTO replies VALUES (?, ?, ?)", (key, json.dumps(reply), int(time.time() * 1000)))

    def grant(self, cmd):
        p = cmd["payload"]
        if p["customer_id"] in self.blocked:
            return {"outcome": "rejected", "reason": "customer_blocked"}
        points = max(1, p["amount_cents"] // 100)
        # One row per saga: a definition with two loyalty steps adds up in it.
        self.db.execute("INSERT INTO grants VALUES (?, ?, ?) ON CONFLICT (saga_id) DO UPDATE "
                        "SET points = points + excluded.points", (cmd["saga_id"], p["customer_id"], points))
        self.db.execute("UPDATE totals SET grants = grants + 1, points_granted = points_granted + ?", (points,))
        return {"outcome": "ok", "data": {"points": points, "customer_id": p["customer_id"]}}

    def revoke(self, cmd):
        forward_key = cmd["idempotency_key"].removesuffix("/compensate") + "/forward"
        forward = self.stored(forward_key)
        if forward is None:  # the compensation came first: the late forward must be refused
            self.store(forward_key, TOMBSTONE)
            return {"outcome": "ok", "data": {"undone": False}}
        if forward["outcome"] != "ok":  # rejected (or a tombstone): nothing to undo
            return {"outcome": "ok", "data": {"undone": False}}
        points = forward["data"]["points"]  # what the forward stored, never this command's order
        self.db.execute("UPDATE grants SET points = points - ? WHERE saga_id = ?", (points, cmd["saga_id"]))
        self.db.execute("DELETE FROM grants WHERE saga_id = ? AND points <= 0", (cmd["saga_id"],))
        self.db.execute("UPDATE totals SET revokes = revokes + 1, points_revoked = points_revoked + ?", (points,))
        return {"outcome": "ok", "data": {"undone": True, "points": points}}

    def stats(self):
        g, r, pg, pr = self.db.execute(
            "SELECT grants, revokes, points_granted, points_revoked FROM totals").fetchone()
        return {"grants": g, "revokes": r, "points_granted": pg, "points_revoked": pr,
                "commands": self.commands, "dedupe_hits": self.dedupe_hits}

    def effects(self, body):
        """One page: {"effects": {saga_id: {...}}, "next_cursor": ...} in saga id order."""
        try:
            req = json.loads(body or b"{}", parse_constant=no_constants)
            if not isinstance(req, dict) or set(req) - {"cursor", "limit"}:
                raise ValueError("expected {\"cursor\": string, \"limit\": integer}")
            cursor, limit = req.get("cursor", ""), req.get("limit", PAGE_DEFAULT)
            if not isinstance(cursor, str) or not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError("cursor must be a string, limit a non-negative integer")
        except (ValueError, RecursionError) as e:
            return {"error": f"bad effects request: {e}"}
        limit = max(1, min(limit, PAGE_MAX))
        rows = self.db.execute("SELECT saga_id, customer_id, points FROM grants WHERE saga_id > ? "
                               "ORDER BY saga_id LIMIT ?", (cursor, limit + 1)).fetchall()
        page, size = {}, 0
        for saga_id, customer, points in rows[:limit]:
            effect = {"customer_id": customer, "points": points}
            size += len(saga_id) + len(json.dumps(effect)) + 8
            if page and size > PAGE_BYTES:
                break
            page[saga_id] = effect
        answer = {"effects": page}
        if len(page) < len(rows):
            answer["next_cursor"] = list(page)[-1]
        return answer


# --- NATS ---------------------------------------------------------------------

async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    ap.add_argument("--nats-nkey", default=os.environ.get("NATS_NKEY"), help="nkey seed file (NATS_NKEY)")
    ap.add_argument("--data-dir", default=os.environ.get("LOYALTY_DATA_DIR", "./data/loyalty"))
    ap.add_argument("--blocked-customers", default="blocked", help="comma-separated customers refused")
    args = ap.parse_args()
    logging.basicConfig(level=os.environ.get("LOYALTY_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    service = Loyalty(args.data_dir, set(filter(None, args.blocked_customers.split(","))))

    async def on_error(e):
        log.warning("nats: %s", e)

    nc = await nats.connect(
        servers=[u.strip() for u in args.nats_url.split(",")], name=NAME,
        nkeys_seed=args.nats_nkey,            # the user participant-loyalty
        inbox_prefix=f"_INBOX_{NAME}",        # the only inbox its permissions allow
        max_reconnect_attempts=-1, error_cb=on_error)

    async def on_command(msg):
        if not msg.reply:
            log.warning("command on %s without a reply subject: dropped", msg.subject)
            return
        try:
            reply, cmd = service.handle(msg.subject, msg.data)
        except Exception as e:  # never crash on a command: answer error, nothing was stored
            log.exception("command on %s", msg.subject)
            reply, cmd = {"outcome": "error", "reason": f"internal: {e}"}, None
        headers = msg.headers or {}
        level = logging.WARNING if cmd is None else logging.INFO
        log.log(level, "command subject=%s saga_id=%s idempotency_key=%s correlation_id=%s outcome=%s%s",
                msg.subject, cmd and cmd["saga_id"], cmd and cmd["idempotency_key"],
                headers.get("X-Correlation-ID"), reply["outcome"],
                f" reason={reply['reason']!r}" if "reason" in reply else "")
        # nc.publish, not msg.respond: respond() would copy the command's headers,
        # and replies carry none.
        await nc.publish(msg.reply, json.dumps(reply).encode())

    async def on_admin(msg):
        if not msg.reply:
            return
        try:
            if msg.subject.endswith(".stats"):
                answer = service.stats()
            elif msg.subject.endswith(".effects"):
                answer = service.effects(msg.data)
            else:
                answer = {"error": f"unknown admin subject {msg.subject}"}
        except Exception as e:
            log.exception("admin %s", msg.subject)
            answer = {"error": f"internal: {e}"}
        await nc.publish(msg.reply, json.dumps(answer).encode())

    # Bounded queues: a flood waits on the server, not in this process's memory.
    limits = {"pending_msgs_limit": 1024, "pending_bytes_limit": 16 * 1024 * 1024}
    await nc.subscribe(f"saga.cmd.{NAME}.*", queue=NAME, cb=on_command, **limits)
    await nc.subscribe(f"saga.admin.{NAME}.>", cb=on_admin, **limits)
    await nc.flush()
    log.info("loyalty listening on %s (data in %s)", args.nats_url, args.data_dir)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()  # finish the commands already received, then close
    service.db.close()
    log.info("loyalty stopped")


if __name__ == "__main__":
    asyncio.run(main())
