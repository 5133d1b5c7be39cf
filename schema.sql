-- The task service's schema: one file for SQLite and PostgreSQL, applied at every start-up,
-- so every statement is idempotent (IF NOT EXISTS).
--
-- Portable types on purpose: ids are TEXT (UUIDs made by the service), and timestamps are TEXT in one
-- fixed ISO 8601 UTC format with microseconds ('2026-01-09T10:15:00.123456Z'), written by the service.
-- That format sorts chronologically as text and reads back byte-for-byte the same on both databases,
-- which a native TIMESTAMPTZ (PostgreSQL) beside SQLite's untyped columns would not.
-- The CHECK constraints repeat the service's validation as a second line of defence.

CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY CHECK (length(id) > 0),
    email       TEXT,
    created_at  TEXT NOT NULL CHECK (length(created_at) = 27),
    -- How many tasks the user has: kept by the service with every insert and delete of a task.
    task_count  INTEGER NOT NULL DEFAULT 0 CHECK (task_count >= 0)
);

CREATE TABLE IF NOT EXISTS tasks (
    id          TEXT PRIMARY KEY CHECK (length(id) = 36),
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title       TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200 AND title = trim(title)),
    description TEXT CHECK (description IS NULL OR length(description) <= 1000),
    completed   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  TEXT NOT NULL CHECK (length(created_at) = 27),
    updated_at  TEXT NOT NULL CHECK (length(updated_at) = 27)
);

-- Every read is one user's tasks in created_at order (the default list order), ties broken by id.
CREATE INDEX IF NOT EXISTS tasks_user_created ON tasks (user_id, created_at, id);
