-- Every user also as the bytes that answer for it: `wire` is the protobuf
-- `UserResponse` that GetUsersByType, GetUsersByIds and GetUser send for a
-- found user (field 3, the `User`: id, nickname, mail_address, user_type; see
-- src/wire.rs). SQLite holds it to the columns (a CHECK), so it can't
-- disagree with them, whoever writes the row. A page of users is read
-- as one blob of these: what a streamed user cost was mostly building owned
-- strings from the row and encoding them again. The type scan's covering
-- index holds it instead of the two text columns.
--
-- Protobuf by hand, with what SQLite has had since generated columns came
-- (3.31; Debian's sqlite3 CLI must still read the file): a varint is 7 bits a
-- byte, low group first, the high bit set on all but the last. A last byte
-- (under 0x80) is char(n); a byte with the high bit set is picked from the
-- blob x'8081…ff' by substr (char() would write two bytes of UTF-8). Text
-- concatenated with `||` keeps its bytes; the CASTs make the result a blob.
-- Ids take up to 5 bytes. Nickname and mail address lengths (at most 256
-- and 254 bytes when valid) and the user's length take up to 2, and a row
-- too long for that gets a NULL `wire`, which the reads report as an invalid
-- stored user. The two strings are left out when empty, as proto3 does; id
-- and user_type never are (the CHECKs). The table is rebuilt to hold the
-- CHECK.
CREATE TABLE users_as_sent (
    id           INTEGER PRIMARY KEY CHECK (id BETWEEN 1 AND 4294967295),
    nickname     TEXT    NOT NULL,
    mail_address TEXT    NOT NULL,
    user_type    INTEGER NOT NULL CHECK (user_type BETWEEN 1 AND 4),
    -- The User message; computed when read, never stored.
    user_message BLOB    GENERATED ALWAYS AS (CAST(
        -- field 1, id
        char(8)
        || CASE WHEN id < 128 THEN char(id) ELSE substr(x'808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff', (id & 127) + 1, 1) END
        || CASE WHEN id < 128 THEN ''
                WHEN id < 16384 THEN char(id >> 7)
                ELSE substr(x'808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff', ((id >> 7) & 127) + 1, 1) END
        || CASE WHEN id < 16384 THEN ''
                WHEN id < 2097152 THEN char(id >> 14)
                ELSE substr(x'808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff', ((id >> 14) & 127) + 1, 1) END
        || CASE WHEN id < 2097152 THEN ''
                WHEN id < 268435456 THEN char(id >> 21)
                ELSE substr(x'808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff', ((id >> 21) & 127) + 1, 1) END
        || CASE WHEN id < 268435456 THEN '' ELSE char(id >> 28) END
        -- field 2, nickname
        || CASE WHEN nickname = '' THEN ''
                WHEN length(CAST(nickname AS BLOB)) < 128
                    THEN char(18, length(CAST(nickname AS BLOB))) || nickname
                WHEN length(CAST(nickname AS BLOB)) < 16384
                    THEN char(18)
                        || substr(x'808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff', (length(CAST(nickname AS BLOB)) & 127) + 1, 1)
                        || char(length(CAST(nickname AS BLOB)) >> 7) || nickname
           END
        -- field 3, mail_address
        || CASE WHEN mail_address = '' THEN ''
                WHEN length(CAST(mail_address AS BLOB)) < 128
                    THEN char(26, length(CAST(mail_address AS BLOB))) || mail_address
                WHEN length(CAST(mail_address AS BLOB)) < 16384
                    THEN char(26)
                        || substr(x'808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff', (length(CAST(mail_address AS BLOB)) & 127) + 1, 1)
                        || char(length(CAST(mail_address AS BLOB)) >> 7) || mail_address
           END
        -- field 4, user_type
        || char(32, user_type)
        AS BLOB)) VIRTUAL,
    -- The UserResponse: field 3, length-delimited, around the User;
    -- computed when read, never stored.
    response     BLOB    GENERATED ALWAYS AS (CAST(
        CASE WHEN length(user_message) < 128 THEN char(26, length(user_message))
             WHEN length(user_message) < 16384
                THEN char(26) || substr(x'808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff', (length(user_message) & 127) + 1, 1)
                    || char(length(user_message) >> 7)
        END || user_message
        AS BLOB)) VIRTUAL,
    -- `response`, stored: an ordinary column, not a generated one, because
    -- SQLite counts a read of a generated column as a read of every column,
    -- and the type scan's index could no longer answer alone. The CHECK
    -- holds it to the columns; the trigger below fills it in when an INSERT
    -- leaves it out. NULL only for a row too long to be valid.
    wire         BLOB    CHECK (wire IS NULL OR wire = response)
) STRICT;

ALTER TABLE users RENAME TO users_before;
ALTER TABLE users_as_sent RENAME TO users;

-- Rows inserted without their answer (by hand, or by an older tool) get it
-- here; the service's own inserts give it (src/wire.rs), and the CHECK
-- above compares.
CREATE TRIGGER users_wire AFTER INSERT ON users WHEN NEW.wire IS NULL
BEGIN
    UPDATE users SET wire = response WHERE id = NEW.id;
END;

INSERT INTO users (id, nickname, mail_address, user_type)
    SELECT id, nickname, mail_address, user_type FROM users_before;
DROP TABLE users_before;

-- GetUsersByType's pages, in (user_type, id) order, from this index alone.
CREATE INDEX users_by_type_as_sent ON users (user_type, id, wire);
