//! Validated user types. Everything that reaches the store has been parsed here
//! first, so the store and the handlers never see a raw, unchecked proto value.

use std::fmt;

/// Longest nickname accepted, in characters.
pub const NICKNAME_MAX_CHARS: usize = 64;
/// RFC 5321 limits: 254 octets for a path, 64 for the local part.
pub const MAIL_MAX_BYTES: usize = 254;
const MAIL_LOCAL_MAX_BYTES: usize = 64;
const MAIL_LABEL_MAX_BYTES: usize = 63;

/// Why a value can't be a user; `field` is the proto field name, so clients
/// can tell which of their inputs to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

impl ValidationError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// A user id: the wire's uint32, never 0 (proto3's "unset").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(u32);

impl UserId {
    pub fn new(raw: u32) -> Option<Self> {
        (raw != 0).then_some(Self(raw))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for UserId {
    type Error = ValidationError;

    fn try_from(raw: u32) -> Result<Self, Self::Error> {
        Self::new(raw).ok_or_else(|| ValidationError::new("id", "must not be 0"))
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The kinds of user a stored user can be. The wire's `NONE` (0) means
/// "unset" and is never stored; it is handled at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserType {
    Normal,
    Administrator,
    Guest,
    Disabled,
}

impl UserType {
    pub const ALL: [UserType; 4] = [
        UserType::Normal,
        UserType::Administrator,
        UserType::Guest,
        UserType::Disabled,
    ];

    /// The wire and database number.
    pub fn number(self) -> i32 {
        match self {
            UserType::Normal => 1,
            UserType::Administrator => 2,
            UserType::Guest => 3,
            UserType::Disabled => 4,
        }
    }

    pub fn from_number(n: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.number() == n)
    }

    /// The proto enum name, as the seed file spells it.
    pub fn name(self) -> &'static str {
        match self {
            UserType::Normal => "NORMAL",
            UserType::Administrator => "ADMINISTRATOR",
            UserType::Guest => "GUEST",
            UserType::Disabled => "DISABLED",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What a request for users of one type asks for: a type, or the wire's
/// `NONE`, which matches nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeFilter {
    Nobody,
    Only(UserType),
}

impl TypeFilter {
    pub fn from_number(n: i32) -> Result<Self, ValidationError> {
        match n {
            0 => Ok(TypeFilter::Nobody),
            n => UserType::from_number(n)
                .map(TypeFilter::Only)
                .ok_or_else(|| ValidationError::new("user_type", format!("{n} is not a UserType"))),
        }
    }
}

fn parse_user_type(n: i32) -> Result<UserType, ValidationError> {
    match TypeFilter::from_number(n)? {
        TypeFilter::Only(t) => Ok(t),
        TypeFilter::Nobody => Err(ValidationError::new(
            "user_type",
            "must be set (NONE is not a user type)",
        )),
    }
}

/// A nickname: 1 to 64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nickname(String);

impl Nickname {
    pub fn parse(raw: String) -> Result<Self, ValidationError> {
        Self::check(&raw)?;
        Ok(Self(raw))
    }

    /// The rules alone, for text that needn't be owned (a stored user on
    /// its way out, see `wire`).
    pub fn check(raw: &str) -> Result<(), ValidationError> {
        const FIELD: &str = "nickname";
        if plausible_ascii_nickname(raw.as_bytes()) {
            return Ok(());
        }
        if raw.is_empty() {
            return Err(ValidationError::new(FIELD, "must not be empty"));
        }
        let chars = if raw.is_ascii() {
            raw.len()
        } else {
            raw.chars().count()
        };
        if chars > NICKNAME_MAX_CHARS {
            return Err(ValidationError::new(
                FIELD,
                format!("must be at most {NICKNAME_MAX_CHARS} characters, got {chars}"),
            ));
        }
        if any_char(raw, |b| b.is_ascii_control(), char::is_control) {
            return Err(ValidationError::new(
                FIELD,
                "must not contain control characters",
            ));
        }
        Ok(())
    }

    /// `check` for a stored nickname's bytes, which must also be UTF-8: a
    /// printable ASCII one (nearly all) is decided in one pass, without
    /// checking its UTF-8 separately.
    pub fn check_stored(raw: &[u8]) -> Result<(), ValidationError> {
        if plausible_ascii_nickname(raw) {
            return Ok(());
        }
        Self::check(utf8("nickname", raw)?)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Printable ASCII throughout, 1 to 64 bytes: what nearly every nickname is,
/// and accepted by the rules (a test compares the two on every ASCII
/// character). Stored users are validated again on every read, so this
/// decides most of them in one pass.
fn plausible_ascii_nickname(raw: &[u8]) -> bool {
    !raw.is_empty()
        && raw.len() <= NICKNAME_MAX_CHARS
        && raw.iter().all(|b| matches!(b, b' '..=b'~'))
}

/// Stored bytes as text, or why they can't be `field`.
fn utf8<'a>(field: &'static str, raw: &'a [u8]) -> Result<&'a str, ValidationError> {
    std::str::from_utf8(raw).map_err(|_| ValidationError::new(field, "must be UTF-8 text"))
}

/// A plausible mail address: `local@domain`, length-limited, no spaces or
/// control characters, a domain of well-formed labels. Deliverability is not
/// our business; obvious garbage is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailAddress(String);

impl MailAddress {
    pub fn parse(raw: String) -> Result<Self, ValidationError> {
        Self::check(&raw)?;
        Ok(Self(raw))
    }

    /// The rules alone, for text that needn't be owned (see `Nickname::check`).
    pub fn check(raw: &str) -> Result<(), ValidationError> {
        // Nearly every address is ASCII and valid, and stored users are
        // validated again on every read (a streamed user paid 1.3k
        // instructions here, a sixth of its cost): one pass decides those.
        // Anything else takes the rules below, which also name what's wrong.
        if raw.len() <= MAIL_MAX_BYTES && plausible_ascii(raw.as_bytes()) {
            return Ok(());
        }
        Self::rules(raw)
    }

    /// `check` for a stored address's bytes, which must also be UTF-8 (see
    /// `Nickname::check_stored`).
    pub fn check_stored(raw: &[u8]) -> Result<(), ValidationError> {
        if raw.len() <= MAIL_MAX_BYTES && plausible_ascii(raw) {
            return Ok(());
        }
        Self::check(utf8("mail_address", raw)?)
    }

    /// The rules, one at a time: the reference `plausible_ascii` must agree with.
    fn rules(raw: &str) -> Result<(), ValidationError> {
        let invalid = |reason: &str| Err(ValidationError::new("mail_address", reason));
        if raw.is_empty() {
            return invalid("must not be empty");
        }
        if raw.len() > MAIL_MAX_BYTES {
            return Err(ValidationError::new(
                "mail_address",
                format!("must be at most {MAIL_MAX_BYTES} bytes"),
            ));
        }
        let Some((local, domain)) = raw.rsplit_once('@') else {
            return invalid("must contain '@'");
        };
        if local.is_empty() || local.len() > MAIL_LOCAL_MAX_BYTES {
            return invalid("the part before '@' must be 1 to 64 bytes");
        }
        if local.contains('@')
            || local.starts_with('.')
            || local.ends_with('.')
            || local.contains("..")
            || any_char(
                local,
                // ASCII whitespace the byte test misses (\x0B) is a control.
                |b| {
                    b.is_ascii_control()
                        || b.is_ascii_whitespace()
                        || matches!(
                            b,
                            b'"' | b'('
                                | b')'
                                | b','
                                | b':'
                                | b';'
                                | b'<'
                                | b'>'
                                | b'['
                                | b'\\'
                                | b']'
                        )
                },
                |c| c.is_control() || c.is_whitespace() || "\"(),:;<>[\\]".contains(c),
            )
        {
            return invalid("the part before '@' is not a plausible mailbox");
        }
        let labels_ok = domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAIL_LABEL_MAX_BYTES
                && !label.starts_with('-')
                && !label.ends_with('-')
                && !any_char(
                    label,
                    |b| !(b.is_ascii_alphanumeric() || b == b'-'),
                    |c| !(c.is_alphanumeric() || c == '-'),
                )
        });
        if !labels_ok {
            return invalid("the part after '@' is not a plausible domain");
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// The ASCII bytes a mailbox may hold (the rules' test, as a table: one
/// load per byte instead of a dozen comparisons).
const MAILBOX_BYTES: [bool; 128] = {
    let mut table = [false; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        let special = matches!(
            c,
            b'"' | b'(' | b')' | b',' | b':' | b';' | b'<' | b'>' | b'[' | b'\\' | b']'
        );
        table[b] = !(c.is_ascii_control() || c.is_ascii_whitespace() || special);
        b += 1;
    }
    table
};

/// Byte classes of an ASCII address for `plausible_ascii`: what may be in
/// the mailbox, what may be in a domain label besides '-'. Bytes beyond
/// ASCII are in neither: such an address takes the rules.
const IN_MAILBOX: u8 = 1;
const ALPHANUMERIC: u8 = 2;
const MAIL_BYTE_CLASSES: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        if MAILBOX_BYTES[b] {
            table[b] |= IN_MAILBOX;
        }
        if c.is_ascii_alphanumeric() {
            table[b] |= ALPHANUMERIC;
        }
        b += 1;
    }
    table
};

/// `MailAddress::rules` for an ASCII address, in one pass over its bytes
/// with one table load per byte: true exactly when those rules accept it (a
/// test compares the two on every short string over the characters that
/// matter); false for any byte beyond ASCII. Splitting at the first '@'
/// instead of the last changes nothing: with two, the rules reject the
/// mailbox and this the domain.
fn plausible_ascii(mail: &[u8]) -> bool {
    // The mailbox, up to the first '@': no '.' first, last or twice in a
    // row (the start counts as a '.').
    let mut at = 0;
    let mut previous = b'.';
    loop {
        let Some(&b) = mail.get(at) else {
            return false;
        };
        if b == b'@' {
            break;
        }
        if MAIL_BYTE_CLASSES[usize::from(b)] & IN_MAILBOX == 0 || (b == b'.' && previous == b'.') {
            return false;
        }
        previous = b;
        at += 1;
    }
    if at == 0 || at > MAIL_LOCAL_MAX_BYTES || previous == b'.' {
        return false;
    }
    // Labels: 1 to 63 letters, digits or '-', neither first nor last a '-'.
    let mut label = 0;
    let mut previous = b'.';
    for &b in &mail[at + 1..] {
        let in_label =
            MAIL_BYTE_CLASSES[usize::from(b)] & ALPHANUMERIC != 0 || (b == b'-' && label > 0);
        if in_label {
            label += 1;
        } else if b == b'.' && label > 0 && previous != b'-' {
            label = 0;
        } else {
            return false;
        }
        if label > MAIL_LABEL_MAX_BYTES {
            return false;
        }
        previous = b;
    }
    label > 0 && previous != b'-'
}

/// Whether any character of `s` passes the test: bytewise when `s` is ASCII
/// (nearly always, and the same answer: `ascii` must agree with `other` on
/// ASCII characters), by `char` otherwise. Stored users are validated again
/// whenever they are read, so this runs for every user a stream sends.
fn any_char(s: &str, ascii: impl Fn(u8) -> bool, other: impl Fn(char) -> bool) -> bool {
    if s.is_ascii() {
        s.bytes().any(ascii)
    } else {
        s.chars().any(other)
    }
}

/// A stored user. Users are immutable once added (AddUser never overwrites).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub nickname: Nickname,
    pub mail_address: MailAddress,
    pub user_type: UserType,
}

impl User {
    /// Validates a user as a client (or the seed file) sent it, field by
    /// field in wire order, so the first bad field is the one reported.
    pub fn parse(
        id: u32,
        nickname: String,
        mail_address: String,
        user_type: i32,
    ) -> Result<Self, ValidationError> {
        Ok(User {
            id: UserId::try_from(id)?,
            nickname: Nickname::parse(nickname)?,
            mail_address: MailAddress::parse(mail_address)?,
            user_type: parse_user_type(user_type)?,
        })
    }
}

#[cfg(test)]
mod tests {
    /// The ASCII fast paths answer as the `char` ones do: each ASCII
    /// character is judged the same alone (bytewise) and beside a
    /// non-ASCII letter (by `char`), in a nickname, a mailbox and a domain.
    #[test]
    fn ascii_and_unicode_paths_agree_on_every_ascii_character() {
        for b in 0u8..128 {
            let c = char::from(b);
            let nick = |s: String| Nickname::parse(s).is_ok();
            assert_eq!(
                nick(format!("a{c}")),
                nick(format!("a{c}é")),
                "nickname {b:#x}"
            );
            let mail = |s: String| MailAddress::parse(s).is_ok();
            assert_eq!(
                mail(format!("a{c}b@example.com")),
                mail(format!("a{c}bé@example.com")),
                "mailbox {b:#x}"
            );
            assert_eq!(
                mail(format!("a@ex{c}ample.com")),
                mail(format!("a@ex{c}amplé.com")),
                "domain {b:#x}"
            );
        }
    }

    use super::*;

    /// The one-pass check of an ASCII address accepts exactly what the rules
    /// accept: every string of up to six characters over an alphabet of the
    /// characters the rules treat differently, and the length limits.
    #[test]
    fn the_ascii_mail_check_agrees_with_the_rules() {
        let by_rules = |s: &str| MailAddress::rules(s).is_ok();
        let one_pass = |s: &str| s.len() <= MAIL_MAX_BYTES && plausible_ascii(s.as_bytes());
        let alphabet = ['a', '0', '.', '-', '@', ' ', '(', '_', '\u{7}'];
        let mut strings = vec![String::new()];
        let mut accepted = 0;
        for _ in 0..6 {
            strings = strings
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            for s in &strings {
                assert_eq!(one_pass(s), by_rules(s), "{s:?}");
                accepted += usize::from(by_rules(s));
            }
        }
        assert!(accepted > 1000, "the alphabet should reach valid addresses");
        // Beyond ASCII, the one pass declines and the rules decide.
        for s in ["é@x.y", "a@é.y", "a@x.é", "a\u{80}@x.y", "a@x\u{ff}.y"] {
            assert!(!one_pass(s), "{s:?}");
            assert_eq!(MailAddress::check(s).is_ok(), by_rules(s), "{s:?}");
        }
        let (a, b) = (|n| "a".repeat(n), |n| "b".repeat(n));
        for s in [
            format!("{}@x.y", a(64)),
            format!("{}@x.y", a(65)),
            format!("x@{}.y", b(63)),
            format!("x@{}.y", b(64)),
            format!("x@y.{}", b(63)),
            format!("x@y.{}", b(64)),
            format!("x@{}.{}.{}.{}", b(63), b(63), b(63), b(59)),
            format!("x@{}.{}.{}.{}", b(63), b(63), b(63), b(61)),
            format!("{}@{}.{}.{}.{}", a(3), b(63), b(63), b(63), b(59)),
        ] {
            assert_eq!(one_pass(&s), by_rules(&s), "{} bytes: {s}", s.len());
            assert_eq!(MailAddress::parse(s.clone()).is_ok(), by_rules(&s));
        }
    }

    fn raw(id: u32, nickname: &str, mail: &str, user_type: i32) -> Result<User, ValidationError> {
        User::parse(id, nickname.into(), mail.into(), user_type)
    }

    fn field_of(r: Result<User, ValidationError>) -> &'static str {
        r.unwrap_err().field
    }

    #[test]
    fn accepts_a_plain_user() {
        let u = raw(7, "Zaru", "zaru@example.com", 1).unwrap();
        assert_eq!(u.id.get(), 7);
        assert_eq!(u.user_type, UserType::Normal);
        assert_eq!(u.nickname.as_str(), "Zaru");
    }

    #[test]
    fn accepts_unicode_nicknames_and_domains() {
        raw(1, "Zäru 猿", "zaru@exämple.jp", 2).unwrap();
        raw(1, &"é".repeat(64), "a.b+c@localhost", 2).unwrap();
    }

    #[test]
    fn rejects_id_zero() {
        assert_eq!(field_of(raw(0, "a", "a@b.c", 1)), "id");
    }

    #[test]
    fn rejects_bad_nicknames() {
        for nick in ["", "a\u{0}b", "tab\there", "new\nline", &"x".repeat(65)] {
            assert_eq!(field_of(raw(1, nick, "a@b.c", 1)), "nickname", "{nick:?}");
        }
    }

    #[test]
    fn rejects_implausible_mail_addresses() {
        let long_local = format!("{}@example.com", "a".repeat(65));
        let long_total = format!("a@{}.com", "b".repeat(60).repeat(5));
        for mail in [
            "",
            "no-at-sign",
            "@example.com",
            "user@",
            "a@b@c.com",
            "two words@example.com",
            "user@exa mple.com",
            "user@.com",
            "user@example..com",
            "user@-example.com",
            ".user@example.com",
            "us..er@example.com",
            "user@exam_ple.com",
            "ctrl\u{7}@example.com",
            &long_local,
            &long_total,
        ] {
            assert_eq!(field_of(raw(1, "n", mail, 1)), "mail_address", "{mail:?}");
        }
    }

    #[test]
    fn rejects_none_and_unknown_user_types() {
        for t in [0, 5, -1, i32::MAX] {
            assert_eq!(field_of(raw(1, "n", "a@b.c", t)), "user_type", "{t}");
        }
    }

    #[test]
    fn type_filter_maps_none_to_nobody() {
        assert_eq!(TypeFilter::from_number(0), Ok(TypeFilter::Nobody));
        assert_eq!(
            TypeFilter::from_number(3),
            Ok(TypeFilter::Only(UserType::Guest))
        );
        assert_eq!(TypeFilter::from_number(9).unwrap_err().field, "user_type");
    }

    #[test]
    fn user_type_names_and_numbers_round_trip() {
        for t in UserType::ALL {
            assert_eq!(UserType::from_number(t.number()), Some(t));
            assert_eq!(UserType::from_name(t.name()), Some(t));
        }
        assert_eq!(UserType::from_name("NONE"), None);
    }
}
