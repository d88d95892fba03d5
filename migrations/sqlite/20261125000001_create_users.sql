-- Users are keyed by the wire id (uint32, never 0). INTEGER PRIMARY KEY makes
-- the id the rowid, so point reads and ordered scans need no extra index.
CREATE TABLE users (
    id           INTEGER PRIMARY KEY CHECK (id BETWEEN 1 AND 4294967295),
    nickname     TEXT    NOT NULL,
    mail_address TEXT    NOT NULL,
    user_type    INTEGER NOT NULL CHECK (user_type BETWEEN 1 AND 4)
) STRICT;

-- GetUsersByType reads in keyset pages: WHERE user_type = ? AND id > ? ORDER BY id.
-- The rowid is implicitly the last column of every index, so this serves the order too.
CREATE INDEX users_by_type ON users (user_type);

-- One row once the seed file has been imported, so restarts never import it again.
CREATE TABLE seed_state (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    applied_at  TEXT    NOT NULL,
    user_count  INTEGER NOT NULL
) STRICT;
