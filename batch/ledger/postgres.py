"""The PostgreSQL store: one ledger shared by every host that runs a job.

Keeps every guarantee of :mod:`batch.ledger.base`, and:

* **A ledger is a name inside a database** (``?ledger=NAME``, default ``default``): a
  schema ``seedance_<name>`` created on first use (under a transaction-scoped advisory
  lock, so two hosts creating it at once end with one) with its ``migrations`` table;
  :data:`MIGRATIONS` bring a ledger an older version created up to date in place.
* **Durable before the wire.** Every transaction commits with ``synchronous_commit=on``
  (set for the session, whatever the database's default): a claim is in the server's
  WAL on disk before the first byte of its request leaves. Claims of a batch are one
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING`` statement: the condition
  and the claim are one atomic step, so two hosts cannot both claim one request (the
  second waits for the first's row lock, then sees ``sending``).
* **One writer per ledger across hosts**: a session advisory lock
  (``pg_try_advisory_lock``) held on a connection of its own, for submit and collect
  apart. It frees when that session ends: at once on a clean exit or a killed process
  (the kernel closes the socket), and when a host vanishes without a word, once the
  server's TCP keepalive gives up on it: the session sets ``tcp_keepalives_idle=10``,
  ``_interval=5``, ``_count=3`` and ``tcp_user_timeout=20 s`` on the server's side, and
  libpq the same on ours (so a server that vanishes is noticed too). Measured (packets
  dropped): the lock is free 15-20 s after the host went silent, the user timeout ending
  the session before the third probe would; a host whose kernel still answers (a stopped
  process) keeps it.
* **The server gone mid-run stops sending at once.** A failed commit is one of
  :attr:`write_errors`: :class:`~batch.ledger.base.AsyncLedger` refuses every later
  claim and keeps the outcomes of requests already on the wire in a local rescue file,
  which the next run on this host replays before it sends. The file is named by the
  ledger's id (a UUID in its ``meta`` table), never by the URL's spelling, so only runs on
  that ledger replay it.
* **No unbounded wait**: ``lock_timeout`` (10 s) and ``statement_timeout`` (120 s) on every
  session: a table locked by someone else becomes a write error the run handles.
* **Text fits**: a NUL (which PostgreSQL's text refuses) is replaced by U+FFFD in every
  value written (:func:`_fit`); input cells holding one are invalid rows before this.
* **The password never leaves**: :class:`PgLocation` prints the URL without it, hands
  it to libpq apart from the URL, and scrubs every driver message of each form of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from batch import logs
from batch.errors import LockedError, StateError
from batch.ledger.base import (
    LEDGER_COLUMNS,
    OUTCOME_COLUMNS,
    SQL_OUTCOME,
    Entry,
    LedgerStore,
    Mark,
    one_line,
    state_home,
    utcnow,
)

SCHEMES = ("postgresql://", "postgres://")
LEDGER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
SCHEMA_VERSION = 3
# The migrations after ``create`` (version 1), each applied in place, in order, by the first
# writable open of an older ledger, in one transaction under the creation lock, and
# recorded in the ``migrations`` table. Every statement is idempotent (``IF NOT EXISTS``):
# a new ledger runs them all after its schema. A version that knows fewer refuses the ledger.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    # main's issue 20: the failure class collect records, the retry columns the results
    # table reads, and batch.expiry's table
    (2, "retry columns, task_expiry", (
        "ALTER TABLE requests ADD COLUMN IF NOT EXISTS failure_class TEXT",
        "ALTER TABLE requests ADD COLUMN IF NOT EXISTS task_attempt INTEGER",
        "ALTER TABLE requests ADD COLUMN IF NOT EXISTS earlier_task_ids TEXT",
        "CREATE TABLE IF NOT EXISTS task_expiry (api TEXT NOT NULL, request_id TEXT NOT NULL, "
        "expires_at TEXT NOT NULL, PRIMARY KEY (api, request_id))",
    )),
    # issue 23: batch.retry's lineage and batch.upload's one upload per content, as SQLite has them
    (3, "task_lineage, uploads", (
        "CREATE TABLE IF NOT EXISTS task_lineage (api TEXT NOT NULL, request_id TEXT NOT NULL, "
        "attempt INTEGER NOT NULL, task_id TEXT, failure_reason TEXT, failure_class TEXT, submitted_at TEXT, "
        "completed_at TEXT, retried_at TEXT NOT NULL, run_id TEXT, sent_run_id TEXT, cost_usd DOUBLE PRECISION, "
        "PRIMARY KEY (api, request_id, attempt))",
        "CREATE INDEX IF NOT EXISTS task_lineage_sent_run ON task_lineage(sent_run_id)",
        "CREATE TABLE IF NOT EXISTS uploads (api TEXT NOT NULL, sha256 TEXT NOT NULL, file_id TEXT, "
        "url TEXT NOT NULL, type TEXT, filename TEXT, size BIGINT, created_at TEXT, uploaded_at TEXT NOT NULL, "
        "PRIMARY KEY (api, sha256))",
    )),
)
# Integer columns: a value copied from SQLite (whose columns take any type) is read as one.
_INTEGERS = frozenset({"row", "error_code", "http_status", "attempts", "polls", "task_attempt", "attempt", "size"})
# Dead-peer detection for the lock's session and the writer's (libpq parameters).
KEEPALIVE = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3",
             "tcp_user_timeout": "20000", "connect_timeout": "10"}
# The tool's own transactions hold row locks for milliseconds (a batch of claims), so a
# 10-s wait for a lock means someone else holds the table (a DDL, a stuck session): the run
# stops waiting, and a signal or --deadline is answered within that. Its longest statement
# (state copy reading a whole ledger) takes seconds; 120 s bounds anything else.
LOCK_TIMEOUT_S = 10
STATEMENT_TIMEOUT_S = 120
# A test switch (never set in production): run without the writer lock to show that the
# conditional claim alone sends each request once.
NO_LOCK_ENV = "SEEDANCE_BATCH_TEST_NO_PG_LOCK"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    api            TEXT NOT NULL,
    request_id     TEXT NOT NULL,
    status         TEXT NOT NULL,
    run_id         TEXT NOT NULL,
    label          TEXT,
    model          TEXT,
    endpoint       TEXT,
    source         TEXT,
    "row"          BIGINT,
    body           TEXT,
    task_id        TEXT,
    poll_url       TEXT,
    error          TEXT,
    error_code     BIGINT,
    http_status    INTEGER,
    attempts       INTEGER NOT NULL DEFAULT 0,
    sending_at     TEXT,
    submitted_at   TEXT,
    updated_at     TEXT NOT NULL,
    task_status    TEXT,
    resource_urls  TEXT,
    resources      TEXT,
    failure_reason TEXT,
    completed_at   TEXT,
    local_paths    TEXT,
    download_error TEXT,
    polls          INTEGER NOT NULL DEFAULT 0,
    cost_usd       DOUBLE PRECISION,
    failure_class  TEXT,
    task_attempt   INTEGER,
    earlier_task_ids TEXT,
    PRIMARY KEY (api, request_id)
);
CREATE INDEX IF NOT EXISTS requests_open_tasks ON requests(task_status) WHERE task_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_label ON requests(api, label) WHERE label IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_run ON requests(run_id);
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    command     TEXT,
    summary     TEXT,
    api         TEXT,
    output      TEXT,
    night       TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS task_expiry (
    api        TEXT NOT NULL,
    request_id TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    PRIMARY KEY (api, request_id)
);
CREATE TABLE IF NOT EXISTS migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL
)
"""

_CLAIM_COLUMNS = ("api, request_id, status, run_id, label, model, endpoint, source, \"row\", body, attempts, "
                  "sending_at, updated_at, cost_usd")
# The same condition as SQLite's claim (batch.ledger.sqlite.SQL_CLAIM), for a batch at once.
_CLAIM_TAIL = (
    " ON CONFLICT (api, request_id) DO UPDATE SET status='sending', run_id=excluded.run_id, label=excluded.label, "
    "model=excluded.model, endpoint=excluded.endpoint, source=excluded.source, \"row\"=excluded.\"row\", "
    "body=excluded.body, sending_at=excluded.sending_at, updated_at=excluded.updated_at, cost_usd=excluded.cost_usd "
    "WHERE requests.status IN ('failed', 'pending') OR (%s AND requests.status IN ('sending', 'unknown') "
    "AND requests.run_id != excluded.run_id) RETURNING request_id"
)


def is_database_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith(SCHEMES)


def pg(sql: str) -> str:
    """A statement written for SQLite's ``?`` placeholders, for psycopg's ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgLocation:
    """A ledger in PostgreSQL: ``postgresql://[user[:password]@][host][:port]/[db][?ledger=NAME&...]``.

    The rest of the query (``sslmode``, ``service``...) goes to libpq as given (the URL is
    edited, never rebuilt: ``postgresql:///db`` and ``postgresql://?service=NAME`` keep
    their form); what the URL leaves out comes from libpq's environment (``PGHOST``,
    ``PGPASSWORD``...), ``~/.pgpass`` or a service file. ``str()`` never shows the password,
    and :meth:`scrub` removes every password the tool can know at start (the URL's, in
    either encoding; ``PGPASSWORD``'s; the pgpass and service files'). A URL libpq would
    misread (an unencoded ``@ / ? # %`` in the password) is refused without quoting it."""

    def __init__(self, url: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        scheme, _, rest = url.partition("://")
        raw_password = _check_url(rest)  # StateError (quoting nothing) for a URL libpq would misread
        base, _, query = rest.partition("?")
        items = [item for item in query.split("&") if item] if query else []
        names = [unquote(item.partition("=")[2]) for item in items if unquote(item.partition("=")[0]) == "ledger"]
        kept = [item for item in items if unquote(item.partition("=")[0]) != "ledger"]
        self.conninfo = f"{scheme}://{base}" + ("?" + "&".join(kept) if kept else "")
        secrets = _known_passwords()
        if raw_password:
            secrets += [raw_password, unquote(raw_password)]
        try:
            params = conninfo_to_dict(self.conninfo)
        except Exception as exc:  # libpq's own reading of the URL (a bad option, an encoding)
            raise StateError(f"--state: not a valid PostgreSQL URL ({_scrub(str(exc).strip(), secrets)})") from None
        if params.get("password"):
            secrets.append(str(params["password"]))
        if params.get("passfile"):  # ?passfile=... names another pgpass file
            secrets += _known_passwords(Path(str(params["passfile"])))
        self._secrets = sorted({p for p in secrets if len(p) >= MIN_PASSWORD}, key=len, reverse=True)
        logs.add_plain_secrets(self._secrets)
        if len(set(names)) > 1:  # which one is meant? the last silently winning names another team's
            raise StateError("--state: the URL names more than one ledger (ledger= given twice); keep one")
        name = names[-1] if names else "default"
        if not LEDGER_NAME.fullmatch(name):
            shown = repr(name) if len(name) <= 60 else repr(name[:57]) + "..."
            raise StateError(f"--state: ledger={shown}: use letters, digits, - and _ (at most 48)")
        self.ledger = name
        self.schema = "seedance_" + name.replace("-", "_").lower()
        if self.schema == SHARED_SCHEMA:
            raise StateError(f"--state: ledger={name!r} is reserved (its schema holds every team's rate budgets); "
                             "choose another name")
        netloc = base.split("/", 1)[0]
        if raw_password is not None:
            netloc = netloc.split(":", 1)[0] + ":***@" + netloc.partition("@")[2]
        path = base[len(base.split("/", 1)[0]):]
        shown = [item for item in kept if "pass" not in unquote(item.partition("=")[0]).lower()]
        self.display = f"{scheme}://{netloc}{path}?" + "&".join([*shown, urlencode([("ledger", name)])])
        # Where this host keeps the ledger's rescue files. They are named by the ledger's id
        # (stored in the ledger, see PgLedger.ledger_id), not by this URL: another spelling
        # of the same database (localhost, a pooler's port, a service file) finds them, and
        # another database with the same spelling does not. ``legacy`` is the name the
        # tool used before (a hash of the spelling), still replayed.
        try:
            parts = urlsplit(url)
            where = f"{parts.hostname}:{parts.port}:{parts.path}"
        except ValueError:
            where = f"{params.get('host')}:{params.get('port')}:/{params.get('dbname')}"
        ident = hashlib.sha256(f"{where}:{name}".encode()).hexdigest()[:16]
        self.home = state_home() / "postgres"
        self.legacy = self.home / f"{name}-{ident}"

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"PgLocation({self.display!r})"

    def __fspath__(self) -> str:  # a path-taking call with a database URL is a bug: say so plainly
        raise TypeError(f"{self.display} is a database, not a file")

    def exists(self) -> bool:
        return True  # the server says when it is opened

    def rescue_file(self, ledger_id: str) -> Path:
        return self.home / f"{self.ledger}-{ledger_id}.rescue.jsonl"

    def scrub(self, text: str) -> str:
        return _scrub(text, self._secrets)

    def connect(self, purpose: str) -> Any:
        """A new autocommit connection with ``synchronous_commit=on`` and the keepalives;
        a :class:`StateError` (exit 2), scrubbed, if the server cannot be reached."""
        import psycopg

        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, application_name=f"seedance-batch {purpose}",
                                   **KEEPALIVE)
            conn.execute("SET synchronous_commit = on")
            # A server (or database, or role) default must not end a session of ours: the
            # lock's session is idle all night, and the writer's waits on the rate. An idle
            # session ended under a run would free its lock for a second host. A transaction
            # of ours is never idle (none spans a wait), so one idle for a minute is a hung
            # process: ending it frees the rows (the shared rate budget) it holds.
            conn.execute("SET idle_in_transaction_session_timeout = '60s'")
            if conn.info.server_version >= 140000:  # the setting is new in 14
                conn.execute("SET idle_session_timeout = 0")
            # Bounded waits (see the module's note): a table locked by someone else, or a
            # statement (a COMMIT waiting for a standby) that never returns, ends in an error
            # the run handles (stop sending, keep the outcomes) instead of holding it and its
            # signals and --deadline for as long as the block lasts.
            conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
            conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT_S}s'")
            # The server's side of the same socket: a host that vanishes (power, network)
            # without closing its session is noticed by the server after ~25 s of silence
            # (10 s idle, 3 probes 5 s apart), which ends the session and frees its lock.
            for name, value in (("tcp_keepalives_idle", 10), ("tcp_keepalives_interval", 5),
                                ("tcp_keepalives_count", 3), ("tcp_user_timeout", 20000)):
                conn.execute(f"SET {name} = {value}")
        except psycopg.Error as exc:
            raise StateError(f"{self}: cannot connect to the ledger's database "
                             f"({self.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)});"
                             f" nothing sent") from None
        return conn


# A shorter "password" is no secret, and replacing it would garble every message.
MIN_PASSWORD = 4
SHARED_SCHEMA = "seedance_shared"
_MALFORMED = ("--state: the PostgreSQL URL cannot be read as libpq would (an unencoded @ / ? # or % in the "
              "user, password or a parameter?); percent-encode them (%40 %2F %3F %23 %25) or give the password "
              "through PGPASSWORD or ~/.pgpass")


def _check_url(rest: str) -> str | None:
    """The password of a ``postgresql://`` URL as written (``rest`` follows the ``//``),
    or ``None``; a :class:`StateError` that quotes nothing of the URL when libpq would read
    it otherwise than meant: it would then print (or resolve as a host name) a piece of
    the password."""
    if "#" in rest or re.search(r"%(?![0-9A-Fa-f]{2})", rest):
        raise StateError(_MALFORMED)
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    path, _, query = tail.partition("?")
    if "@" in path or any("=" not in item for item in query.split("&") if item):
        raise StateError(_MALFORMED)  # a password's tail after an unencoded / or ?
    if "@" not in authority:
        # No user part: whatever follows a ':' is a port (or a list of them).
        for hostport in authority.split(","):
            port = hostport.rpartition("]")[2].rpartition(":")[2] if ":" in hostport.rpartition("]")[2] else ""
            if port and not port.isdigit():
                raise StateError(_MALFORMED)  # "user:pass/..." read as host "user", port "pass"
        return None
    userinfo, _, hosts = authority.partition("@")
    if "@" in hosts:
        raise StateError(_MALFORMED)  # an unencoded @ in the password: its tail would be a host name
    return userinfo.partition(":")[2] if ":" in userinfo else None


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret in text or quote(secret, safe="") in text or quote(secret) in text:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***").replace(quote(secret), "***")
    return text


def _bounded_text(path: Path) -> str:
    """A credentials file's first MiB; nothing from a FIFO or device planted there."""
    try:
        if not path.is_file():
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def _known_passwords(passfile: Path | None = None) -> list[str]:
    """Every database password libpq may send that the tool can know at start: PGPASSWORD,
    the pgpass file (PGPASSFILE, else ~/.pgpass) and the service files (PGSERVICEFILE or
    ~/.pg_service.conf, and PGSYSCONFDIR's pg_service.conf). A hostile or confused server
    may echo it in an error; these are scrubbed from every message."""
    found = [os.environ.get("PGPASSWORD") or ""]
    home = Path(os.path.expanduser("~"))
    for line in _bounded_text(passfile or Path(os.environ.get("PGPASSFILE") or home / ".pgpass")).splitlines():
        fields, field, escaped = [], "", False
        for char in line:
            if escaped:
                field, escaped = field + char, False
            elif char == "\\":
                escaped = True
            elif char == ":" and len(fields) < 4:
                fields, field = [*fields, field], ""
            else:
                field += char
        if len(fields) == 4 and not line.lstrip().startswith("#"):
            found.append(field)
    services = [Path(os.environ.get("PGSERVICEFILE") or home / ".pg_service.conf")]
    if os.environ.get("PGSYSCONFDIR"):
        services.append(Path(os.environ["PGSYSCONFDIR"]) / "pg_service.conf")
    for service in services:
        for line in _bounded_text(service).splitlines():
            key, eq, value = line.strip().partition("=")
            if eq and key.strip().lower() == "password":
                found.append(value.strip())
    return [p for p in found if p]


def _fit(values: Iterable[Any]) -> tuple[Any, ...]:
    """Parameters as PostgreSQL's text takes them: a NUL (which SQLite keeps and PostgreSQL
    refuses, failing the whole transaction) becomes U+FFFD. Inputs refuse NUL cells
    (batch.expand.nul_errors); this is for text from elsewhere: the provider's answers, an
    older SQLite ledger being copied, a rescue file."""
    return tuple(v.replace("\x00", "\ufffd") if type(v) is str and "\x00" in v else v for v in values)


def _lock_key(schema: str, kind: str) -> int:
    digest = hashlib.sha256(f"seedance-batch:{schema}:{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PgLedger(LedgerStore):
    """One ledger (a schema) in a PostgreSQL database."""

    def __init__(self, location: PgLocation, api: str, *, readonly: bool = False) -> None:
        import psycopg

        super().__init__()
        self.location = location
        self.path = location  # what messages name
        self.api = api
        self.readonly = readonly
        self.write_errors = (psycopg.Error, OSError)
        self._lock_conn: Any = None
        self._known_columns: dict[str, frozenset[str]] = {}
        self._lock_held: tuple[str, int, int, int] | None = None  # kind, its session's pid, key, guard
        self.db = location.connect("ledger")
        try:
            self._open()
        except psycopg.Error as exc:
            self.db.close()
            raise StateError(f"{location}: cannot use the ledger ({location.scrub(one_line(exc))})") from None
        except BaseException:
            self.db.close()
            raise

    def _open(self) -> None:
        from psycopg import sql

        schema = sql.Identifier(self.location.schema)
        exists = self.db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.location.schema,)).fetchone()
        if not exists and self.readonly:
            raise _NoLedger
        if exists:  # another role's ledger: say which right is missing, not "relation does not exist"
            usable = self.db.execute("SELECT has_schema_privilege(%s, 'USAGE')", (self.location.schema,)).fetchone()[0]
            if not usable:
                raise StateError(f"{self.location}: permission denied for schema {self.location.schema}: the "
                                 f"ledger's owner must grant this role USAGE on it and SELECT, INSERT, UPDATE on "
                                 f"its tables; nothing sent")
        if not exists or not self._has_tables():
            with self.db.transaction():
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self.location.schema, "create"),))
                self.db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
                self.db.execute(sql.SQL("SET LOCAL search_path TO {}").format(schema))
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute("INSERT INTO migrations VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                (1, "create", utcnow()))
                self.db.execute("INSERT INTO meta VALUES ('created_at', %s) ON CONFLICT DO NOTHING", (utcnow(),))
        self.db.execute(sql.SQL("SET search_path TO {}").format(schema))
        if not self.readonly:  # the ledger's identity: names its rescue files on every host
            self.db.execute("INSERT INTO meta VALUES ('ledger_id', %s) ON CONFLICT DO NOTHING", (str(uuid.uuid4()),))
        found = self.db.execute("SELECT value, current_database() FROM meta WHERE key = 'ledger_id'").fetchone()
        # The id travels with a pg_dump of the schema; the database it lives in does not: a
        # restored copy in another database must not take the original's rescue files.
        self.ledger_id = f"{found[0]}.{hashlib.sha256(found[1].encode()).hexdigest()[:8]}" if found else None
        version = self.db.execute("SELECT max(version) FROM migrations").fetchone()[0] or 0
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.location}: ledger schema {version} is newer than this tool ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION and not self.readonly:
            with self.db.transaction():
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self.location.schema, "create"),))
                for number, name, statements in MIGRATIONS:
                    if number > version:
                        for statement in statements:
                            self.db.execute(statement)
                        self.db.execute("INSERT INTO migrations VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                        (number, name, utcnow()))
        self._check_name()

    def _check_name(self) -> None:
        """One ledger name per schema: names that differ only in case or in ``-`` vs ``_``
        land in one schema, so the first name used (recorded in ``meta``) owns it and any
        other is refused: two teams must not share requests, spend caps and locks unawares."""
        name = self.location.ledger
        if not self.readonly:
            self.db.execute("INSERT INTO meta VALUES ('ledger_name', %s) ON CONFLICT DO NOTHING", (name,))
        row = self.db.execute("SELECT value FROM meta WHERE key = 'ledger_name'").fetchone()
        if row is not None and row[0] != name:
            raise StateError(f"--state: ledger={name!r} would use the schema {self.location.schema}, which is "
                             f"ledger {row[0]!r}'s (names differing only in case or in - and _ share one); "
                             f"write ledger={row[0]} for that ledger, or choose another name")

    def _has_tables(self) -> bool:
        return self.db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename IN "
                               "('requests', 'runs', 'meta', 'migrations')",
                               (self.location.schema,)).fetchone()[0] == 4

    # -- the writer lock -------------------------------------------------------------
    def lock(self, kind: str) -> None:
        """The submit (or collect) lock of this ledger for every host: a session advisory
        lock on a connection of its own, so it lives exactly as long as this process's
        session (see the module's note on hosts that vanish)."""
        if os.environ.get(NO_LOCK_ENV) == "1":
            return
        import psycopg

        conn = self.location.connect(f"{kind} lock")
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_lock_key(self.location.schema, kind),)).fetchone()[0]
        except psycopg.Error as exc:
            conn.close()
            raise StateError(f"{self.location}: cannot lock the ledger ({self.location.scrub(one_line(exc))})") \
                from None
        if not got:
            conn.close()
            raise LockedError(f"another {kind} run is using ledger {self.location}; nothing sent")
        try:
            # A run whose lock session ended may be inside a claim that checked the lock just
            # before we took it: wait for that transaction (it holds the guard) to end, so
            # what this run reads (the night's spend) includes its claims.
            guard = _lock_key(self.location.schema, f"{kind} guard")
            conn.execute("SELECT pg_advisory_lock(%s), pg_advisory_unlock(%s)", (guard, guard))
        except psycopg.Error as exc:
            conn.close()
            raise StateError(f"{self.location}: cannot lock the ledger ({self.location.scrub(str(exc))})") from None
        self._lock_conn = conn
        self._lock_held = (kind, conn.info.backend_pid, _lock_key(self.location.schema, kind) & (2**64 - 1), guard)

    def _check_lock(self, cur: Any) -> None:
        """Claims only while this run's lock session still holds the lock: an admin, a
        proxy or a timeout may end that session, and then a second host may take the lock
        and spend the same night. In the claim's transaction: take the guard (a second run
        that takes the lock waits for it, see :meth:`lock`), then look the lock up in
        ``pg_locks``; so a claim either commits before the next holder reads the ledger, or
        is refused (:class:`LockLostError`: the run stops sending)."""
        assert self._lock_held is not None
        kind, pid, key, guard = self._lock_held
        held = cur.execute(
            "SELECT pg_advisory_xact_lock(%s), EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND pid = %s AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1)",
            (guard, pid, key >> 32, key & 0xFFFFFFFF)).fetchone()[1]
        if not held:
            raise LockLostError(f"the {kind} lock on ledger {self.location} was lost (its database session ended: "
                                f"an administrator, a proxy or a timeout); nothing more is sent")

    @property
    def where(self) -> str:
        return str(self.location)

    def rescue_file(self) -> Path:
        return self.location.rescue_file(self.ledger_id or "unknown")

    def rescue_files(self) -> tuple[list[Path], list[Path]]:
        mine = [self.rescue_file(), self.location.legacy.with_name(self.location.legacy.name + ".rescue.jsonl")]
        try:
            others = sorted(p for p in self.location.home.glob("*.rescue.jsonl") if p not in mine)
        except OSError:
            others = []
        return mine, others

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()
        if self._lock_conn is not None:
            with contextlib.suppress(Exception):
                # Released before close returns: a closed session's backend frees its locks
                # only when it gets round to exiting, and the next run (or a test) may ask first.
                self._lock_conn.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(Exception):
                self._lock_conn.close()
            self._lock_conn = None
            self._lock_held = None

    # -- writes ------------------------------------------------------------------------
    def commit(self, sending: Sequence[Mark], outcomes: Sequence[tuple[Any, ...]],
               other: Sequence[tuple[str, tuple[Any, ...]]], resend_unknown: bool) -> set[str]:
        claimed: set[str] = set()
        now = utcnow()
        with self.db.transaction(), self.db.cursor() as cur:
            for statement, params in other:
                cur.execute(pg(statement), _fit(params))
            if outcomes:
                cur.executemany(pg(SQL_OUTCOME), [_fit((*o[:-2], now, self.api, o[-2], o[-1])) for o in outcomes])
            marks = list({m.request_id: m for m in sending}.values())
            if marks and self._lock_held is not None:
                self._check_lock(cur)
            if marks:
                values = ", ".join(["(%s, %s, 'sending', %s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s)"] * len(marks))
                params: list[Any] = []
                for m in marks:
                    params += [self.api, m.request_id, m.run_id, m.label, m.model, m.endpoint, m.source, m.row,
                               m.body, now, now, m.cost]
                cur.execute(f"INSERT INTO requests({_CLAIM_COLUMNS}) VALUES {values}{_CLAIM_TAIL}",
                            _fit((*params, resend_unknown)))
                claimed = {row[0] for row in cur.fetchall()}
        return claimed

    # -- the statements of batch.ledger.queries, in PostgreSQL ----------------------------
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(pg(sql), _fit(params)).fetchall()

    def _atomic(self, batches: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> list[int]:
        changed = []
        with self.db.transaction(), self.db.cursor() as cur:
            for sql, rows in batches:
                if rows:
                    cur.executemany(pg(sql), [_fit(r) for r in rows])
                changed.append(cur.rowcount if rows else 0)
        return changed

    def _columns(self, table: str) -> frozenset[str]:
        if table not in self._known_columns:
            self._known_columns[table] = frozenset(r[0] for r in self.db.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
                (self.location.schema, table)))
        return self._known_columns[table]

    def _coerce(self, table: str, column: str, value: Any) -> Any:
        return _int(value) if column in _INTEGERS else value

    # -- reads -------------------------------------------------------------------------

    def run_outputs(self, run_ids: Iterable[str]) -> dict[str, str]:
        return dict(self.db.execute("SELECT run_id, output FROM runs WHERE output IS NOT NULL AND run_id = ANY(%s)",
                                    (sorted(set(run_ids)),)).fetchall())

    def _rows_of(self, columns: Sequence[str], ids: Sequence[str],
                 apis: Sequence[str] | None = None) -> list[tuple[Any, ...]]:
        cols = ", ".join('"row"' if c == "row" else c for c in columns)
        scope = list(apis) if apis is not None else [self.api]
        return self.db.execute(f"SELECT {cols} FROM requests WHERE api = ANY(%s) AND request_id = ANY(%s)",
                               (scope, list(ids))).fetchall()

    def lookup(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> dict[str, Entry]:
        return {row[1]: Entry(*row) for row in self._rows_of(LEDGER_COLUMNS, ids, apis)}

    def known(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> set[str]:
        return {row[0] for row in self._rows_of(("request_id",), ids, apis)}

    def task_states(self, ids: Sequence[str], apis: Sequence[str] | None = None) -> dict[str, tuple[Any, ...]]:
        return {row[0]: row[1:] for row in self._rows_of(("request_id", "api", "status", "task_id"), ids, apis)}

    def outcome_columns(self, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        # A v1 ledger opened read-only lacks the retry columns (retries never ran on it).
        tail = ("COALESCE(task_attempt, 1)", "earlier_task_ids") if "task_attempt" in self._columns("requests") \
            else ("1", "NULL")
        return self._rows_of((*OUTCOME_COLUMNS[:-2], *tail), ids)

    def labels(self, labels: Sequence[str], before_run: str | None = None) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for label, rid in self.db.execute(
                "SELECT label, request_id FROM requests WHERE api=%s AND label = ANY(%s) "
                "AND status IN ('submitted', 'sending', 'unknown') AND run_id IS DISTINCT FROM %s",
                (self.api, list(labels), before_run)):
            found.setdefault(label, set()).add(rid)
        return found

    def tasks_to_follow(self, include_success: bool, apis: Sequence[str]) -> list[Entry]:
        done = ["failed", "expired"] if include_success else ["success", "failed", "expired"]
        cols = ", ".join(LEDGER_COLUMNS)
        return [Entry(*row) for row in self.db.execute(
            f"SELECT {cols} FROM requests WHERE task_id IS NOT NULL AND status = 'submitted' AND api = ANY(%s) "
            f"AND (task_status IS NULL OR NOT (task_status = ANY(%s))) ORDER BY submitted_at", (list(apis), done))]


class LockLostError(StateError):
    """The session holding this run's writer lock ended: another run may hold it now."""


class _NoLedger(Exception):
    """A read-only open of a ledger not created yet."""


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def locked_pg_ledger(location: PgLocation, api: str, kind: str = "submit") -> Iterator[PgLedger]:
    """The ledger, created on first use, under its writer lock; outcomes an earlier run
    on this host could not commit are replayed first."""
    ledger = PgLedger(location, api)
    try:
        ledger.lock(kind)
        ledger._replay_rescue()
        yield ledger
    finally:
        ledger.close()


def open_pg_readonly(location: PgLocation, api: str) -> PgLedger | None:
    try:
        return PgLedger(location, api, readonly=True)
    except _NoLedger:
        return None


class PgBudget:
    """The pacing state of one API key for every host whose ledger is in this database
    (:class:`batch.ratelimit.SharedBudget`'s role across machines): a row per key (named
    by a hash of it) in ``seedance_shared.rate_budgets``, read and written under
    ``SELECT ... FOR UPDATE`` in one short transaction per step. Times are kept on the
    server's clock (``clock_timestamp()``): each process keeps its offset to it as measured
    over the fastest round trip seen (every step reads the clock too), so hosts whose own
    clocks disagree still share one timeline (to within half that round trip). The budget
    is advisory pacing, not a record: its commits skip the WAL flush. If the database fails,
    the process paces alone from then on (its ledger stops the run anyway)."""

    def __init__(self, location: PgLocation, key: str, capacity: int) -> None:
        from batch.ratelimit import _LocalBudget

        self.location = location
        self.digest = hashlib.sha256(key.encode()).hexdigest()[:16]  # names the key, cannot reveal it
        self.capacity = capacity
        self._fallback: _LocalBudget | None = None
        self._warned: set[str] = set()
        self._local_budget = lambda: _LocalBudget(capacity)
        self.db = location.connect("rate budget")
        try:
            self.db.execute("SET synchronous_commit = off")
            with self.db.transaction():
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("seedance_shared", "create"),))
                self.db.execute("CREATE SCHEMA IF NOT EXISTS seedance_shared")
                self.db.execute("CREATE TABLE IF NOT EXISTS seedance_shared.rate_budgets (key TEXT PRIMARY KEY, "
                                "next DOUBLE PRECISION NOT NULL, resume_at DOUBLE PRECISION NOT NULL, "
                                "starts DOUBLE PRECISION[] NOT NULL)")
                self.db.execute("INSERT INTO seedance_shared.rate_budgets VALUES (%s, 0, 0, '{}') "
                                "ON CONFLICT DO NOTHING", (self.digest,))
            self.offset, self._rtt = 0.0, float("inf")
            for _ in range(5):
                t0 = time.monotonic()
                server = self.db.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
                self._sample(server, t0, time.monotonic())
        except Exception:
            self.db.close()
            raise

    def _sample(self, server: float, t0: float, t1: float) -> None:
        """Keep the offset to the server's clock measured over the fastest round trip so far
        (NTP's filter): its error is at most half that trip."""
        if t1 - t0 < self._rtt:
            self._rtt, self.offset = t1 - t0, server - (t0 + t1) / 2

    @contextlib.contextmanager
    def locked(self) -> Iterator[Any]:
        import psycopg

        if self._fallback is not None:
            yield self._fallback
            return
        try:
            tx = self.db.transaction()
            tx.__enter__()
            found = None
            for _ in range(2):
                t0 = time.monotonic()
                found = self.db.execute(_BUDGET_ROW, (_RING, self.digest)).fetchone()
                if found is not None:
                    break
                # Deleted under us (another team's cleanup): recreate it, then lock it.
                self._damage("the key's row was deleted; recreated")
                self.db.execute("INSERT INTO seedance_shared.rate_budgets VALUES (%s, 0, 0, '{}') "
                                "ON CONFLICT DO NOTHING", (self.digest,))
            if found is None:
                raise psycopg.DataError("the key's rate budget row cannot be recreated")
            *row, server = found
            self._sample(server, t0, time.monotonic())
        except psycopg.Error as exc:
            self._give_up(exc)
            yield self._fallback
            return
        view = _BudgetView((row[0], row[1], row[2] or []), self.offset, self.capacity, self._damage)
        try:
            yield view
            self.db.execute("UPDATE seedance_shared.rate_budgets SET next=%s, resume_at=%s, starts=%s WHERE key=%s",
                            (view.next + self.offset, view.resume_at + self.offset, view.stored(), self.digest))
            tx.__exit__(None, None, None)
        except psycopg.Error as exc:
            self._give_up(exc)
        except BaseException as exc:
            with contextlib.suppress(psycopg.Error):
                tx.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def _damage(self, what: str) -> None:
        """Say once per kind that the shared row was damaged (it is data another team can write)."""
        if what not in self._warned:
            import structlog

            self._warned.add(what)
            structlog.get_logger("batch").warning("rate_budget_damaged", state=str(self.location), damage=what,
                                                  consequence="ignored; pacing goes on from now")

    def _give_up(self, exc: BaseException) -> None:
        import structlog

        structlog.get_logger("batch").warning("rate_budget_not_shared", state=str(self.location),
                                              error=self.location.scrub(one_line(exc, 200)),
                                              consequence="this process paces alone from now on")
        self._fallback = self._local_budget()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()


# The row of a key, locked; its starts bounded to the ring a local budget keeps (a row
# another team filled with millions of entries costs one bounded read).
_BUDGET_ROW = ("SELECT next, resume_at, starts[greatest(1, cardinality(starts) - %s + 1):], "
               "extract(epoch FROM clock_timestamp())::float8 FROM seedance_shared.rate_budgets "
               "WHERE key = %s FOR UPDATE")
_RING = 1 << 16
# How far ahead of the server's clock a stored time may be: a slot or a pause (a
# Retry-After) an hour ahead is damage (or a server clock stepped back), and a start is
# recorded as "now", so one more than a few seconds ahead is damage too.
HORIZON = 3600.0
START_SKEW = 5.0


class _BudgetView:
    """A key's budget row while its row lock is held, in this process's monotonic time.
    The row is data another team can write: a time that is not a finite number, or lies
    beyond :data:`HORIZON` (a start beyond :data:`START_SKEW`), is dropped with a warning,
    so a damaged row can neither stall the key's runs nor make a waiter spin."""

    def __init__(self, row: tuple[Any, Any, Sequence[Any]], offset: float, capacity: int,
                 damaged: Any = None) -> None:
        nxt, resume, starts = row
        now = time.monotonic()
        say = damaged or (lambda _what: None)
        self.next = self._sane(nxt, offset, now + HORIZON, "next", say)
        self.resume_at = self._sane(resume, offset, now + HORIZON, "resume_at", say)
        kept = [t for t in (self._sane(s, offset, now + START_SKEW, "starts", say, None) for s in starts)
                if t is not None]
        self._starts = sorted(kept)
        self._offset, self._keep = offset, max(capacity, len(self._starts))

    @staticmethod
    def _sane(value: Any, offset: float, limit: float, field: str, say: Any, instead: Any = 0.0) -> Any:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            say(f"{field} is not a finite number")
            return instead
        if value - offset > limit:
            say(f"{field} lies ahead of the server's clock beyond the horizon")
            return instead
        return value - offset

    def nth_last_start(self, n: int) -> float | None:
        return self._starts[-n] if len(self._starts) >= n else None

    def add_start(self, t: float) -> None:
        self._starts.append(t)

    def stored(self) -> list[float]:
        return [s + self._offset for s in self._starts[-self._keep:]]
