//! A stored user as the bytes that answer for it: the whole `UserResponse`
//! message GetUsersByType, GetUsersByIds and GetUser send for a user that
//! exists (`error` false and `message` empty, so only field 3, the user).
//!
//! Why: building that message from owned strings cost a streamed user more
//! than SQLite's read of it (two allocations, prost's encoding, and the JSON
//! the rows crossed sqlx's thread in). SQLite keeps every user in this form
//! (the generated `wire` column, `migrations/sqlite`), so a page of users
//! arrives as one blob of consecutive messages, which `split` checks and
//! cuts into shared slices without copying, and `grpc::response` sends each
//! as is. PostgreSQL's users are encoded here (`encode`).
//!
//! Nothing reaches a client unchecked: `split` parses every message and
//! validates the user in it by the same rules as AddUser (`domain`), so a
//! row that another process wrote behind our back is still an error, not
//! an answer. The bytes are exactly prost's for the same message (the tests
//! in `grpc::response` compare them): fields in tag order, proto3's empty
//! values left out, minimal varints.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{
    domain::{MailAddress, Nickname, User, UserId, UserType},
    error::StoreError,
};

/// Field 3 of `UserResponse` (the user), length-delimited: the first byte of
/// every message here.
const USER_RESPONSE_USER: u8 = 3 << 3 | 2;
/// The fields of `User`, each key as one byte: id (1) and user_type (4) are
/// varints, nickname (2) and mail_address (3) length-delimited.
const ID: u8 = 1 << 3;
const NICKNAME: u8 = 2 << 3 | 2;
const MAIL_ADDRESS: u8 = 3 << 3 | 2;
const USER_TYPE: u8 = 4 << 3;
/// In place of a message: a row whose `wire` is NULL. Field number 0 is no
/// field, so no message starts with it.
const NO_WIRE: u8 = 0;

/// A valid user, encoded as the response that answers for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedUser {
    id: UserId,
    message: Bytes,
}

impl EncodedUser {
    pub fn encode(user: &User) -> Self {
        let nickname = user.nickname.as_str().as_bytes();
        let mail = user.mail_address.as_str().as_bytes();
        let id = u64::from(user.id.get());
        let user_type = user.user_type.number().unsigned_abs().into();
        let body = 1
            + varint_len(id)
            + 1
            + varint_len(nickname.len() as u64)
            + nickname.len()
            + 1
            + varint_len(mail.len() as u64)
            + mail.len()
            + 1
            + varint_len(user_type);
        let mut buf = BytesMut::with_capacity(1 + varint_len(body as u64) + body);
        buf.put_u8(USER_RESPONSE_USER);
        put_varint(&mut buf, body as u64);
        buf.put_u8(ID);
        put_varint(&mut buf, id);
        // Never empty (validated), so never left out as proto3 would.
        buf.put_u8(NICKNAME);
        put_varint(&mut buf, nickname.len() as u64);
        buf.put_slice(nickname);
        buf.put_u8(MAIL_ADDRESS);
        put_varint(&mut buf, mail.len() as u64);
        buf.put_slice(mail);
        buf.put_u8(USER_TYPE);
        put_varint(&mut buf, user_type);
        Self {
            id: user.id,
            message: buf.freeze(),
        }
    }

    pub fn id(&self) -> UserId {
        self.id
    }

    /// The encoded `UserResponse`.
    pub fn message(&self) -> &Bytes {
        &self.message
    }

    pub fn into_message(self) -> Bytes {
        self.message
    }

    /// The user again, as owned values.
    pub fn to_user(&self) -> User {
        let fields = read(&self.message, 0)
            .map(|(_, fields)| fields)
            .expect("an EncodedUser holds one well-formed message");
        let text = |raw: &[u8]| String::from_utf8(raw.to_vec()).expect("validated as UTF-8");
        User::parse(
            fields.id,
            text(fields.nickname),
            text(fields.mail_address),
            fields.user_type,
        )
        .expect("an EncodedUser holds a valid user")
    }

    /// Cuts consecutive messages (as SQLite concatenates a page of them)
    /// into users, checking each. Anything but valid users, one after
    /// another to the last byte, is an error naming what was wrong.
    pub(crate) fn split(messages: Bytes) -> Result<Vec<Self>, StoreError> {
        // About 45 bytes a user in practice; a guess, not a limit.
        let mut users = Vec::with_capacity(messages.len() / 32);
        let mut at = 0;
        while at < messages.len() {
            let (end, fields) = read(&messages, at).map_err(|what| {
                StoreError::Internal(format!(
                    "decoding stored users: {what} at byte {at} of {}",
                    messages.len()
                ))
            })?;
            let id = fields
                .validate()
                .map_err(|e| StoreError::Internal(format!("stored user {e}")))?;
            users.push(Self {
                id,
                message: messages.slice(at..end),
            });
            at = end;
        }
        Ok(users)
    }
}

/// A message's user, borrowed from the bytes; its text is UTF-8 once
/// validated.
struct Fields<'a> {
    id: u32,
    nickname: &'a [u8],
    mail_address: &'a [u8],
    user_type: i32,
}

impl Fields<'_> {
    /// The rules AddUser applies (`User::parse`), without owning the text,
    /// UTF-8 included.
    fn validate(&self) -> Result<UserId, String> {
        let id = self.id;
        let invalid = |e: crate::domain::ValidationError| format!("{id} is invalid: {e}");
        let valid_id = UserId::try_from(id).map_err(invalid)?;
        Nickname::check_stored(self.nickname).map_err(invalid)?;
        MailAddress::check_stored(self.mail_address).map_err(invalid)?;
        if UserType::from_number(self.user_type).is_none() {
            return Err(format!("{id} is invalid: user_type {}", self.user_type));
        }
        Ok(valid_id)
    }
}

/// The message starting at `at`: where it ends, and its fields. Only the
/// form written here and by the `wire` column is accepted.
fn read(bytes: &[u8], at: usize) -> Result<(usize, Fields<'_>), &'static str> {
    let mut r = Reader { bytes, at };
    // What SQLite's reads give for a row with no `wire` (see SELECT_MANY).
    if bytes.get(at) == Some(&NO_WIRE) {
        return Err("a stored user too long to be valid (it has no wire)");
    }
    r.key(USER_RESPONSE_USER)?;
    let len = usize::try_from(r.varint()?).map_err(|_| "a length")?;
    let end = r.at.checked_add(len).filter(|&e| e <= bytes.len());
    let end = end.ok_or("a user that ends inside the data")?;
    let mut r = Reader {
        bytes: &bytes[..end],
        at: r.at,
    };
    r.key(ID)?;
    let id = u32::try_from(r.varint()?).map_err(|_| "an id that fits 32 bits")?;
    let nickname = r.string_if(NICKNAME)?;
    let mail_address = r.string_if(MAIL_ADDRESS)?;
    r.key(USER_TYPE)?;
    // Any number SQLite's CHECK let through fits; what doesn't, validation names.
    let user_type = i32::try_from(r.varint()?).unwrap_or(-1);
    if r.at != end {
        return Err("the user's end");
    }
    Ok((
        end,
        Fields {
            id,
            nickname,
            mail_address,
            user_type,
        },
    ))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn key(&mut self, key: u8) -> Result<(), &'static str> {
        if self.bytes.get(self.at) == Some(&key) {
            self.at += 1;
            Ok(())
        } else {
            Err("a field key")
        }
    }

    /// A varint of up to 10 bytes (64 bits).
    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let &byte = self.bytes.get(self.at).ok_or("a varint")?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err("a varint of at most 10 bytes")
    }

    /// A string field's bytes (their UTF-8 is checked by validation), or
    /// none (proto3 leaves empty strings out).
    fn string_if(&mut self, key: u8) -> Result<&'a [u8], &'static str> {
        if self.bytes.get(self.at) != Some(&key) {
            return Ok(&[]);
        }
        self.at += 1;
        let len = usize::try_from(self.varint()?).map_err(|_| "a length")?;
        let end = self.at.checked_add(len).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or("a string that ends inside the user")?;
        let text = &self.bytes[self.at..end];
        self.at = end;
        Ok(text)
    }
}

fn varint_len(value: u64) -> usize {
    // 1 byte per started group of 7 bits (0 takes one byte too).
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u32, nickname: &str, mail: &str, user_type: i32) -> User {
        User::parse(id, nickname.into(), mail.into(), user_type).unwrap()
    }

    #[test]
    fn encoded_users_split_back_into_themselves() {
        let users = [
            user(1, "a", "a@b.c", 1),
            user(
                4_294_967_295,
                &"猿".repeat(64),
                &format!("{}@x.io", "l".repeat(64)),
                4,
            ),
            user(300, "Zäru", "z@exämple.jp", 2),
        ];
        let mut page = BytesMut::new();
        for u in &users {
            page.put_slice(EncodedUser::encode(u).message());
        }
        let split = EncodedUser::split(page.freeze()).unwrap();
        let back: Vec<User> = split.iter().map(EncodedUser::to_user).collect();
        assert_eq!(back, users);
        assert_eq!(split[1].id().get(), 4_294_967_295);
        assert_eq!(EncodedUser::split(Bytes::new()).unwrap(), []);
    }

    #[test]
    fn varint_lengths() {
        for (value, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::from(u32::MAX), 5),
            (u64::MAX, 10),
        ] {
            assert_eq!(varint_len(value), len, "{value}");
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            assert_eq!(buf.len(), len, "{value}");
            assert_eq!(Reader { bytes: &buf, at: 0 }.varint(), Ok(value));
        }
    }

    /// Malformed bytes and invalid users are errors, never a panic or a
    /// user: every truncation of a good page, and hand-made bad ones.
    #[test]
    fn anything_else_is_an_error() {
        let good = EncodedUser::encode(&user(7, "ab", "a@b.c", 1)).into_message();
        for cut in 1..good.len() {
            assert!(
                EncodedUser::split(good.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
        // Bodies of users, each wrapped as field 3 below.
        let bad: &[&[u8]] = &[
            // id 0
            b"\x08\x00\x12\x02ab\x1a\x05a@b.c\x20\x01",
            // no nickname
            b"\x08\x07\x1a\x05a@b.c\x20\x01",
            // not an address
            b"\x08\x07\x12\x02ab\x1a\x05a b.c\x20\x01",
            // user_type 5
            b"\x08\x07\x12\x02ab\x1a\x05a@b.c\x20\x05",
            // invalid UTF-8 in the nickname
            b"\x08\x07\x12\x02\xff\xfe\x1a\x05a@b.c\x20\x01",
            // invalid UTF-8 in the address, and a lone continuation byte
            b"\x08\x07\x12\x02ab\x1a\x05a@b.\xc3\x20\x01",
            b"\x08\x07\x12\x02a\x80\x1a\x05a@b.c\x20\x01",
            // fields out of order
            b"\x08\x07\x1a\x05a@b.c\x12\x02ab\x20\x01",
            // a string past the user's end
            b"\x08\x07\x12\x20ab\x1a\x05a@b.c\x20\x01",
            // trailing bytes inside the user
            b"\x08\x07\x12\x02ab\x1a\x05a@b.c\x20\x01\x00",
            // an id over 32 bits
            b"\x08\x80\x80\x80\x80\x10\x12\x02ab\x1a\x05a@b.c\x20\x01",
        ];
        assert!(EncodedUser::split(good.clone()).is_ok());
        let wrapped = |first: u8, body: &[u8]| {
            let mut message = vec![first, u8::try_from(body.len()).unwrap()];
            message.extend_from_slice(body);
            Bytes::from(message)
        };
        let valid_body = &good[2..];
        assert!(EncodedUser::split(wrapped(USER_RESPONSE_USER, valid_body)).is_ok());
        // A row with no `wire`, after a good one.
        let mut missing = good.to_vec();
        missing.push(NO_WIRE);
        let error = EncodedUser::split(missing.into()).unwrap_err().to_string();
        assert!(error.contains("no wire"), "{error}");
        // Another field of UserResponse than the user.
        assert!(EncodedUser::split(wrapped(1 << 3 | 2, valid_body)).is_err());
        for (i, body) in bad.iter().enumerate() {
            let result = EncodedUser::split(wrapped(USER_RESPONSE_USER, body));
            assert!(
                matches!(result, Err(StoreError::Internal(_))),
                "case {i}: {result:?}"
            );
        }
    }
}
