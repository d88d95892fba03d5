//! Users out of the JSON that the read queries aggregate them into: arrays of
//! `[id, nickname, mail_address, user_type]` rows, as SQLite's `json_array`
//! writes them. serde_json decoded a streamed user in 1.6k instructions, a
//! fifth of its cost; this reader knows the one shape and takes 1.2k, most
//! of it allocating the two strings the protobuf message will own. It
//! accepts any valid JSON of that shape (whitespace, escapes), leaves the
//! rare escaped string to serde_json, and calls anything else an error.

use super::{Row, to_user};
use crate::{domain::User, store::StoreError};

/// `[row, …]` into users.
pub(super) fn users(json: &str) -> Result<Vec<User>, StoreError> {
    let mut reader = Reader::new(json);
    let users = reader.list(Reader::user)?;
    reader.end()?;
    Ok(users)
}

struct Reader<'a> {
    json: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(json: &'a str) -> Self {
        Self { json, at: 0 }
    }

    fn error(&self, expected: &str) -> StoreError {
        StoreError::Internal(format!(
            "decoding stored users: expected {expected} at byte {} of {}",
            self.at,
            self.json.len()
        ))
    }

    /// The next byte that isn't JSON whitespace (SQLite writes none).
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.json.as_bytes();
        while let Some(&b) = bytes.get(self.at) {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    fn eat(&mut self, byte: u8, expected: &str) -> Result<(), StoreError> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn end(&mut self) -> Result<(), StoreError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("the end")),
        }
    }

    /// A JSON array, each element read by `item`.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.eat(b'[', "'['")?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(items);
                }
                _ => return Err(self.error("',' or ']'")),
            }
        }
    }

    fn user(&mut self) -> Result<User, StoreError> {
        self.eat(b'[', "a row")?;
        let id = self.integer()?;
        self.eat(b',', "','")?;
        let nickname = self.string()?;
        self.eat(b',', "','")?;
        let mail_address = self.string()?;
        self.eat(b',', "','")?;
        let user_type = self.integer()?;
        self.eat(b']', "the row's end")?;
        let row: Row = (id, nickname, mail_address, user_type);
        to_user(row)
    }

    /// An integer as SQLite writes one: an optional '-' and up to 19 digits.
    fn integer(&mut self) -> Result<i64, StoreError> {
        self.peek();
        let bytes = self.json.as_bytes();
        let negative = bytes.get(self.at) == Some(&b'-');
        let start = self.at + usize::from(negative);
        let mut end = start;
        let mut magnitude: i64 = 0;
        while let Some(&b) = bytes.get(end).filter(|b| b.is_ascii_digit()) {
            magnitude = magnitude
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(b - b'0')))
                .ok_or_else(|| self.error("an integer that fits 64 bits"))?;
            end += 1;
        }
        if end == start {
            return Err(self.error("an integer"));
        }
        self.at = end;
        Ok(if negative { -magnitude } else { magnitude })
    }

    /// A string; one with escapes is decoded by serde_json.
    fn string(&mut self) -> Result<String, StoreError> {
        self.eat(b'"', "a string")?;
        let start = self.at;
        let bytes = self.json.as_bytes();
        let mut end = start;
        let mut escaped = false;
        loop {
            match memchr::memchr2(b'"', b'\\', &bytes[end..]).map(|i| end + i) {
                Some(quote) if bytes[quote] == b'"' => {
                    end = quote;
                    break;
                }
                // Whatever follows a backslash is part of the string.
                Some(backslash) if backslash + 1 < bytes.len() => {
                    escaped = true;
                    end = backslash + 2;
                }
                _ => {
                    self.at = bytes.len();
                    return Err(self.error("the string's closing '\"'"));
                }
            }
        }
        self.at = end + 1;
        // The quotes are ASCII, so both ends are character boundaries.
        if escaped {
            serde_json::from_str(&self.json[start - 1..=end])
                .map_err(|e| StoreError::Internal(format!("decoding stored users: a string: {e}")))
        } else {
            Ok(self.json[start..end].to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u32, nickname: &str, mail: &str, user_type: i32) -> User {
        User::parse(id, nickname.into(), mail.into(), user_type).unwrap()
    }

    #[test]
    fn reads_rows_as_sqlite_writes_them() {
        let json = r#"[[7,"a","a@x.io",1],[8,"Zäru 猿","b@exämple.jp",4]]"#;
        assert_eq!(
            users(json).unwrap(),
            [
                row(7, "a", "a@x.io", 1),
                row(8, "Zäru 猿", "b@exämple.jp", 4)
            ]
        );
        assert_eq!(users("[]").unwrap(), []);
    }

    /// Whatever serde_json writes for a user (escapes and all), and with
    /// whitespace around every token, reads back as that user.
    #[test]
    fn reads_escapes_and_whitespace_like_serde_json() {
        let nicknames = [
            "quote \" here",
            "back\\slash",
            "tab-less é \u{2028} 🎉",
            "/",
        ];
        for nickname in nicknames {
            let user = row(4_294_967_295, nickname, "o'brien+x@sub.example.org", 3);
            let json = serde_json::to_string(&[(
                user.id.get(),
                user.nickname.as_str(),
                user.mail_address.as_str(),
                user.user_type.number(),
            )])
            .unwrap();
            assert_eq!(users(&json).unwrap(), std::slice::from_ref(&user), "{json}");
            let spaced = json
                .replace(',', " ,\n ")
                .replace('[', "[ ")
                .replace(']', "\t]");
            if !nickname.contains([',', '[', ']']) {
                assert_eq!(users(&spaced).unwrap(), [user], "{spaced}");
            }
        }
        // Escaped characters that JSON may write as \u sequences.
        let json = r#"[[1,"\u0041\u00e9\ud83c\udf89","a@b.c",1]]"#;
        assert_eq!(users(json).unwrap()[0].nickname.as_str(), "Aé🎉");
    }

    #[test]
    fn anything_else_is_an_error_not_a_panic() {
        for json in [
            "",
            "[",
            "[[",
            "[[1",
            "[[1,",
            r#"[[1,"a"#,
            r#"[[1,"a\"#,
            r#"[[1,"a","b@c.d"]]"#,
            r#"[[1,"a","b@c.d",1,5]]"#,
            r#"[[1,"a","b@c.d",1]"#,
            r#"[[1,"a","b@c.d",1]] x"#,
            r#"[[1,"a","b@c.d",1],]"#,
            r#"[[-,"a","b@c.d",1]]"#,
            r#"[[1.5,"a","b@c.d",1]]"#,
            r#"[[1,2,"b@c.d",1]]"#,
            r#"[[1,"a\q","b@c.d",1]]"#,
            r#"[[99999999999999999999,"a","b@c.d",1]]"#,
            r#"[[1,"a","b@c.d",1\"#,
            r#"{"id":1}"#,
            "[1]",
        ] {
            assert!(users(json).is_err(), "{json:?}");
        }
    }

    #[test]
    fn stored_users_are_still_validated() {
        for json in [
            r#"[[0,"a","a@b.c",1]]"#,
            r#"[[4294967296,"a","a@b.c",1]]"#,
            r#"[[1,"","a@b.c",1]]"#,
            r#"[[1,"a","not an address",1]]"#,
            r#"[[1,"a","a@b.c",5]]"#,
        ] {
            assert!(
                matches!(users(json), Err(StoreError::Internal(_))),
                "{json}"
            );
        }
    }
}
