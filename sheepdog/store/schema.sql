-- Schema version 1 of the sheepdog results database.
-- Later versions are reached by the migration steps in storage.py.

CREATE TABLE IF NOT EXISTS requests (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created     REAL    NOT NULL,
    func        BLOB    NOT NULL,
    ns          BLOB,
    secret      TEXT    NOT NULL,
    n_tasks     INTEGER NOT NULL,
    settings    TEXT    NOT NULL DEFAULT '{}',
    state       TEXT    NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'cancelled')),
    label       TEXT
);

CREATE TABLE IF NOT EXISTS tasks (
    request_id    INTEGER NOT NULL REFERENCES requests (id),
    idx           INTEGER NOT NULL CHECK (idx >= 1),
    args          BLOB    NOT NULL,
    state         TEXT    NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'leased', 'done', 'error', 'cancelled')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    lease         TEXT,
    lease_expires REAL,
    worker        TEXT,
    host          TEXT,
    result        BLOB,
    error         TEXT,
    stdout        TEXT,
    stderr        TEXT,
    duration_s    REAL,
    started       REAL,
    finished      REAL,
    PRIMARY KEY (request_id, idx)
);

-- Serves both the pending scan (lease_expires is NULL there, so rows come in
-- idx order) and the scan for overdue leases.
CREATE INDEX IF NOT EXISTS tasks_by_state
    ON tasks (request_id, state, lease_expires, idx);

CREATE TABLE IF NOT EXISTS jobs (
    request_id  INTEGER NOT NULL REFERENCES requests (id),
    job_id      TEXT    NOT NULL,
    array_size  INTEGER NOT NULL,
    submitted   REAL    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'submitted',
    info        TEXT    NOT NULL DEFAULT '{}',
    PRIMARY KEY (request_id, job_id)
);
