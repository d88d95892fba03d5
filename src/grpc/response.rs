//! `UserResponse`, written here instead of generated (`build.rs` maps the
//! proto's message to this type), so that it can also be a message that is
//! already encoded: a stored user as SQLite keeps it (`wire::EncodedUser`)
//! goes to the wire as is, with no strings to own and nothing to encode.
//! Otherwise it is the message prost would generate, field for field and
//! byte for byte; the tests below hold both forms to prost's encoding.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError,
    encoding::{DecodeContext, WireType, bool, message, skip_field, string},
};

use super::proto::User;
use crate::wire::EncodedUser;

#[derive(Clone, PartialEq, Default, Debug)]
pub struct UserResponse {
    pub error: bool,
    pub message: String,
    pub user: Option<User>,
    /// The whole message, encoded, for a found stored user; the fields
    /// above are then unset. Never set by decoding.
    encoded: Option<Bytes>,
}

impl UserResponse {
    pub fn new(error: bool, message: String, user: Option<User>) -> Self {
        Self {
            error,
            message,
            user,
            encoded: None,
        }
    }
}

impl From<EncodedUser> for UserResponse {
    fn from(user: EncodedUser) -> Self {
        Self {
            encoded: Some(user.into_message()),
            ..Self::default()
        }
    }
}

impl prost::Message for UserResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(encoded) = &self.encoded {
            buf.put_slice(encoded);
            return;
        }
        if self.error {
            bool::encode(1, &self.error, buf);
        }
        if !self.message.is_empty() {
            string::encode(2, &self.message, buf);
        }
        if let Some(user) = &self.user {
            message::encode(3, user, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let (result, field) = match tag {
            1 => (bool::merge(wire_type, &mut self.error, buf, ctx), "error"),
            2 => (
                string::merge(wire_type, &mut self.message, buf, ctx),
                "message",
            ),
            3 => (
                message::merge(
                    wire_type,
                    self.user.get_or_insert_with(User::default),
                    buf,
                    ctx,
                ),
                "user",
            ),
            _ => return skip_field(wire_type, tag, buf, ctx),
        };
        result.map_err(|mut error| {
            error.push("UserResponse", field);
            error
        })
    }

    fn encoded_len(&self) -> usize {
        if let Some(encoded) = &self.encoded {
            return encoded.len();
        }
        (if self.error {
            bool::encoded_len(1, &self.error)
        } else {
            0
        }) + (if self.message.is_empty() {
            0
        } else {
            string::encoded_len(2, &self.message)
        }) + self
            .user
            .as_ref()
            .map_or(0, |user| message::encoded_len(3, user))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::domain;

    /// prost's own encoding of the same message, from a derived twin.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(bool, tag = "1")]
        error: bool,
        #[prost(string, tag = "2")]
        message: String,
        #[prost(message, optional, tag = "3")]
        user: Option<User>,
    }

    fn users() -> Vec<User> {
        [
            (1, "a".to_owned(), "a@b.c".to_owned(), 1),
            (127, "x".repeat(127 % 64 + 1), "y@z.io".to_owned(), 2),
            (
                128,
                "猿".repeat(64),
                format!("{}@{}.jp", "l".repeat(64), "d".repeat(63)),
                3,
            ),
            (
                u32::MAX,
                "Zäru 🎉".to_owned(),
                "o'brien+x@sub.example.org".to_owned(),
                4,
            ),
        ]
        .into_iter()
        .map(|(id, nickname, mail_address, user_type)| User {
            id,
            nickname,
            mail_address,
            user_type,
        })
        .collect()
    }

    #[test]
    fn an_encoded_user_is_the_message_prost_writes() {
        for user in users() {
            let generated = Generated {
                error: false,
                message: String::new(),
                user: Some(user.clone()),
            };
            let domain_user = domain::User::parse(
                user.id,
                user.nickname.clone(),
                user.mail_address.clone(),
                user.user_type,
            )
            .unwrap();
            let ours = UserResponse::from(EncodedUser::encode(&domain_user));
            assert_eq!(ours.encode_to_vec(), generated.encode_to_vec(), "{user:?}");
            assert_eq!(ours.encoded_len(), generated.encoded_len());
            // And it decodes as the structured message.
            let decoded = UserResponse::decode(&*ours.encode_to_vec()).unwrap();
            assert_eq!(decoded, UserResponse::new(false, String::new(), Some(user)));
        }
    }

    #[test]
    fn structured_messages_are_the_ones_prost_writes() {
        let mut cases = vec![
            (false, String::new(), None),
            (true, "not found".to_owned(), None),
            (true, "é".repeat(200), None),
        ];
        cases.extend(users().into_iter().map(|u| (false, String::new(), Some(u))));
        for (error, message, user) in cases {
            let ours = UserResponse::new(error, message.clone(), user.clone());
            let generated = Generated {
                error,
                message,
                user,
            };
            let bytes = generated.encode_to_vec();
            assert_eq!(ours.encode_to_vec(), bytes);
            assert_eq!(ours.encoded_len(), generated.encoded_len());
            assert_eq!(UserResponse::decode(&*bytes).unwrap(), ours);
        }
        // Unknown fields are skipped, as prost's generated code does.
        let mut with_unknown = vec![9 << 3, 1];
        with_unknown.extend(
            Generated {
                error: true,
                message: "x".into(),
                user: None,
            }
            .encode_to_vec(),
        );
        let decoded = UserResponse::decode(&*with_unknown).unwrap();
        assert_eq!(decoded, UserResponse::new(true, "x".into(), None));
        assert!(UserResponse::decode(&b"\x1a\x05\x08"[..]).is_err());
    }
}
