"""The ledger's statements that read the same in both stores' SQL, written once.

Guarantee: every statement here is valid SQLite (3.35 or later) and PostgreSQL as written,
with SQLite's ``?`` placeholders; the PostgreSQL store rewrites them to ``%s``
(:func:`batch.ledger.postgres.pg`). So they use only the common dialect: ``"row"`` quoted
(a keyword in PostgreSQL), ``ON CONFLICT ... DO UPDATE`` rather than ``INSERT OR REPLACE``,
``IS DISTINCT FROM``, ``CAST(? AS TEXT)`` where PostgreSQL must know a parameter's type.
Statements whose dialects genuinely differ stay in their store: the batched claim with
``RETURNING`` (PostgreSQL) against one claim a row (SQLite), ``IN`` lists chunked to
SQLite's parameter limit against ``= ANY(array)``, the locks, the schemas.
"""

# -- runs --------------------------------------------------------------------------------
START_RUN = "INSERT INTO runs(run_id, started_at, command, api, output, night) VALUES (?, ?, ?, ?, ?, ?)"
FINISH_RUN = "UPDATE runs SET finished_at=?, summary=? WHERE run_id=?"
RUN_PLACES = 'SELECT request_id, source, "row", model FROM requests WHERE api=? AND run_id=? ORDER BY source, "row"'
RUN_COUNTS = "SELECT status, count(*) FROM requests WHERE api=? AND run_id=? GROUP BY status"

# -- requests ----------------------------------------------------------------------------
APIS = "SELECT api, count(*) FROM requests GROUP BY api"
COUNTS = "SELECT status, count(*) FROM requests GROUP BY status"
MOVE_API = "UPDATE requests SET api=?, poll_url=NULL, updated_at=? WHERE api=?"
SET_META = "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value"
# Requests that runs of a night sent and the provider may have accepted (the spend cap).
NIGHT_REQUESTS = (
    "SELECT r.model, r.body, r.cost_usd FROM requests r JOIN runs u ON u.run_id = r.run_id "
    "WHERE u.night = ? AND r.status IN ('sending', 'submitted', 'unknown') AND (r.api = ?) = ?"
)
# An import meets a row the ledger has: left as it is, unless a run left it ``sending`` or
# ``unknown`` without a task id (its ledger write failed) and the table holds the task id.
IMPORT_TASK = (
    'INSERT INTO requests(api, request_id, status, run_id, model, endpoint, source, "row", body, task_id, '
    "submitted_at, updated_at) VALUES (?, ?, CASE WHEN CAST(? AS TEXT) IS NULL THEN 'unknown' ELSE 'submitted' END, "
    "'imported', ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (api, request_id) DO UPDATE SET status='submitted', task_id=excluded.task_id, "
    "submitted_at=COALESCE(requests.submitted_at, excluded.submitted_at), updated_at=excluded.updated_at "
    "WHERE excluded.task_id IS NOT NULL AND requests.status IN ('sending', 'unknown') AND requests.task_id IS NULL"
)

# -- batch.retry: the lineage of a request's tasks ----------------------------------------
FAILED_TASKS = (
    "SELECT request_id, task_id, failure_reason, submitted_at, completed_at, COALESCE(task_attempt, 1), "
    "earlier_task_ids, run_id, cost_usd, failure_class FROM requests "
    "WHERE api = ? AND status = 'submitted' AND task_status = 'failed' AND request_id IN ({marks})"
)
# The earlier task of a request, moved out of its row (the same attempt twice: the later wins).
ADD_LINEAGE = (
    "INSERT INTO task_lineage(api, request_id, attempt, task_id, failure_reason, failure_class, submitted_at, "
    "completed_at, retried_at, run_id, sent_run_id, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (api, request_id, attempt) DO UPDATE SET task_id=excluded.task_id, "
    "failure_reason=excluded.failure_reason, failure_class=excluded.failure_class, "
    "submitted_at=excluded.submitted_at, completed_at=excluded.completed_at, retried_at=excluded.retried_at, "
    "run_id=excluded.run_id, sent_run_id=excluded.sent_run_id, cost_usd=excluded.cost_usd"
)
# ... and its row made ``pending`` for the next attempt (only a row still holding a failed task).
RESET_FOR_RETRY = (
    "UPDATE requests SET status = 'pending', task_id = NULL, poll_url = NULL, task_status = NULL, "
    "resource_urls = NULL, resources = NULL, failure_reason = NULL, failure_class = NULL, completed_at = NULL, "
    "local_paths = NULL, download_error = NULL, polls = 0, attempts = 0, error = ?, "
    "task_attempt = ?, earlier_task_ids = ?, updated_at = ? "
    "WHERE api = ? AND request_id = ? AND status = 'submitted' AND task_status = 'failed'"
)
# The earlier tasks sent by runs of a night (the body is the request's, the same for every
# attempt). A failed task counts: the provider took it and may bill it.
NIGHT_ATTEMPTS = (
    "SELECT r.model, r.body, l.cost_usd FROM task_lineage l JOIN runs u ON u.run_id = l.sent_run_id "
    "JOIN requests r ON r.api = l.api AND r.request_id = l.request_id "
    "WHERE u.night = ? AND (l.api = ?) = ?"
)
NEXT_ATTEMPTS = "SELECT request_id, task_attempt FROM requests WHERE api = ? AND task_attempt > 1 AND task_id IS NULL"
LINEAGE_TASKS = "SELECT count(*) FROM task_lineage WHERE task_id IS NOT NULL"
RETRIES_SENT = ("SELECT count(*) FROM requests WHERE api = ? AND run_id = ? AND task_attempt > 1 "
                "AND status IN ('submitted', 'unknown')")

# -- batch.upload: one uploaded image per API and content ---------------------------------
UPLOADS = "SELECT sha256, url FROM uploads WHERE api = ?"
RECORD_UPLOAD = (
    "INSERT INTO uploads(api, sha256, file_id, url, type, filename, size, created_at, uploaded_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (api, sha256) DO UPDATE SET file_id=excluded.file_id, "
    "url=excluded.url, type=excluded.type, filename=excluded.filename, size=excluded.size, "
    "created_at=excluded.created_at, uploaded_at=excluded.uploaded_at"
)

# -- batch.expiry: when a task's outputs stop being downloadable --------------------------
EXPIRIES = "SELECT api, request_id, expires_at FROM task_expiry"
SET_EXPIRY = ("INSERT INTO task_expiry(api, request_id, expires_at) VALUES (?, ?, ?) "
              "ON CONFLICT (api, request_id) DO UPDATE SET expires_at = excluded.expires_at")
