-- GetUsersByType reads its pages in id order from users_by_type, and each
-- entry there sent SQLite back to the table for the row: a B-tree descent per
-- user, at scattered pages. An index that holds the whole row in (user_type,
-- id) order answers a page from consecutive index pages alone. It replaces
-- the narrower index, which it serves in full (same leading columns).
CREATE INDEX users_by_type_covering ON users (user_type, id, nickname, mail_address);
DROP INDEX users_by_type;
