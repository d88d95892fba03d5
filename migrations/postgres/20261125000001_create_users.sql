-- Users are keyed by the wire id (uint32, never 0): BIGINT holds all of it.
CREATE TABLE users (
    id           BIGINT   PRIMARY KEY CHECK (id BETWEEN 1 AND 4294967295),
    nickname     TEXT     NOT NULL,
    mail_address TEXT     NOT NULL,
    user_type    SMALLINT NOT NULL CHECK (user_type BETWEEN 1 AND 4)
);

-- GetUsersByType reads in keyset pages: WHERE user_type = $1 AND id > $2
-- ORDER BY id LIMIT $3, one range scan of this index per page.
CREATE INDEX users_by_type ON users (user_type, id);

-- One row once the seed has been imported. Replicas starting together all
-- try to insert it, in the same transaction as the users; the primary key
-- lets exactly one succeed, and only that one imports (see seed.rs).
CREATE TABLE seed_state (
    singleton   SMALLINT    PRIMARY KEY CHECK (singleton = 1),
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    user_count  INTEGER     NOT NULL
);
