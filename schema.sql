-- The task service's schema, in numbered steps. A new database runs every step, a database made by an
-- earlier release only the steps it has not had, at every start-up, in one transaction, under a lock
-- (see apply_schema in service.py). schema_version keeps the last step run. A step, once released,
-- never changes: a change is a new step at the end.
--
-- Ids are TEXT (UUIDs made by the service), and timestamps are TEXT in one fixed ISO 8601 UTC format
-- with microseconds ('2026-01-09T10:15:00.123456Z'), written by the service: it sorts chronologically
-- as text and is served back byte for byte. (Releases before step 4 also ran on SQLite, which is why
-- the first steps chose portable types.) The CHECK constraints repeat the service's validation as a
-- second line of defence.
-- (No semicolons in comments: the file is split into statements at them. No colon before a word
-- either: the statements go through SQLAlchemy's text(), which would take it for a parameter.)

-- step 1: the first release
CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY CHECK (length(id) > 0),
    email       TEXT,
    created_at  TEXT NOT NULL CHECK (length(created_at) = 27)
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

-- step 2: how many tasks each user has, kept with every insert and delete of a task
ALTER TABLE users ADD COLUMN task_count INTEGER NOT NULL DEFAULT 0 CHECK (task_count >= 0);
UPDATE users SET task_count = (SELECT COUNT(*) FROM tasks WHERE tasks.user_id = users.id);

-- step 3: priorities, tags, due dates, reminders and recurring tasks
-- priority is 1 (low), 2 (medium) or 3 (high), so that it sorts as it reads.
ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 2 CHECK (priority BETWEEN 1 AND 3);
-- tags as the client spelled them, a JSON array of strings, for reading. task_tags below holds each
-- tag's case-folded key, for filtering.
ALTER TABLE tasks ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
-- due_date as served: a date (10 characters) or a timestamp (27). due_at is the instant it stands
-- for, in sorting and filters: a date-only due date is the end of that day, UTC.
ALTER TABLE tasks ADD COLUMN due_date TEXT CHECK (due_date IS NULL OR length(due_date) IN (10, 27));
ALTER TABLE tasks ADD COLUMN due_at TEXT CHECK (due_at IS NULL OR length(due_at) = 27);
ALTER TABLE tasks ADD COLUMN remind_at TEXT CHECK (remind_at IS NULL OR length(remind_at) = 27);
ALTER TABLE tasks ADD COLUMN recurrence TEXT CHECK (recurrence IS NULL OR recurrence IN ('daily', 'weekly', 'monthly'));
-- The task that completing this one created. Not a foreign key: deleting the successor must not let
-- this task make another one.
ALTER TABLE tasks ADD COLUMN next_occurrence_id TEXT;

CREATE TABLE task_tags (
    task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL,
    -- The tag's case-folded key: case folding may lengthen it ('ß' is 'ss'), so no 40 here.
    tag     TEXT NOT NULL CHECK (length(tag) > 0),
    -- The task's, so that a tag's tasks come newest first from the index below.
    created_at TEXT NOT NULL CHECK (length(created_at) = 27),
    PRIMARY KEY (task_id, tag)
);

-- A tag filter starts from one user's tasks with that tag, in created_at order.
CREATE INDEX task_tags_user_tag ON task_tags (user_id, tag, created_at, task_id);
-- Sorting by due date puts tasks without one last in either order: (due_at IS NULL) leads the key.
CREATE INDEX tasks_user_due ON tasks (user_id, (due_at IS NULL), due_at, id);
CREATE INDEX tasks_user_due_desc ON tasks (user_id, (due_at IS NULL), due_at DESC, id DESC);
CREATE INDEX tasks_user_priority ON tasks (user_id, priority, id);

-- step 4: PostgreSQL only. A recurring task needs a due date. The service decides it before writing
-- (recurs_without_due_date), and this CHECK, by name, is the backstop it answers with the same 422.
ALTER TABLE tasks ADD CONSTRAINT recurring_task_needs_due_date CHECK (recurrence IS NULL OR due_date IS NOT NULL);
-- Each tag's case-folded key, for filtering, moves into the task's own row (task_tags goes).
ALTER TABLE tasks ADD COLUMN tag_keys TEXT[] NOT NULL DEFAULT '{}';
UPDATE tasks SET tag_keys = tagged.keys
FROM (SELECT task_id, array_agg(tag ORDER BY tag) AS keys FROM task_tags GROUP BY task_id) AS tagged
WHERE tasks.id = tagged.task_id;
DROP TABLE task_tags;
-- A tag filter (`tag_keys @> the keys asked for`) finds one user's tasks with the tag from one index,
-- led by user_id: btree_gin lets a GIN index hold a plain column. It is a trusted extension: whoever
-- may create objects in the database may add it. (A GIN index on tag_keys alone found every user's.)
CREATE EXTENSION IF NOT EXISTS btree_gin;
CREATE INDEX tasks_user_tag_keys ON tasks USING GIN (user_id, tag_keys);
