//! Authorization for the UserManager RPCs: bearer tokens scoped `read` or
//! `write`, or with mTLS a client certificate whose subject is mapped to a
//! scope. AddUser needs `write`, every other UserManager RPC `read`; health
//! and reflection are not checked. No credentials: UNAUTHENTICATED; too small
//! a scope: PERMISSION_DENIED.
//!
//! Only SHA-256 digests of the tokens are kept, and a presented token is
//! compared with every one of them in constant time, so neither the answer
//! time nor a memory dump gives a token away. Tokens are never logged.

use std::{
    collections::BTreeMap,
    fmt,
    path::Path,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::{Context as _, bail};
use futures::future::{Either, Ready, ready};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tonic::{
    Status,
    body::Body,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};

mod subject;

use crate::{
    config::{AuthSettings, check_token},
    grpc::methods::Method,
};
use subject::subject_names;

/// What a credential allows; `Write` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    Read = 1,
    Write = 2,
}

impl Scope {
    /// The scope each RPC needs. No wildcard: a new RPC in the proto does
    /// not compile until its scope is chosen here.
    pub(crate) const fn needed_by(method: Method) -> Scope {
        match method {
            Method::AddUser => Scope::Write,
            Method::GetUser
            | Method::CountAlreadyUsers
            | Method::GetUsersByType
            | Method::GetUsersByIds => Scope::Read,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Scope::Read),
            2 => Some(Scope::Write),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Read => "read",
            Scope::Write => "write",
        })
    }
}

type TokenDigest = [u8; 32];

fn digest(token: &[u8]) -> TokenDigest {
    Sha256::digest(token).into()
}

pub(crate) struct Authorizer {
    /// One entry per distinct token, with its largest scope.
    tokens: Vec<(TokenDigest, Scope)>,
    /// Client-certificate subject → its largest scope.
    subjects: BTreeMap<String, Scope>,
}

impl Authorizer {
    /// `None` when authorization is off. Reads `auth.tokens_file`; its errors
    /// name the file and line, never a token.
    pub(crate) fn from_settings(settings: &AuthSettings) -> anyhow::Result<Option<Arc<Self>>> {
        if !settings.enabled {
            return Ok(None);
        }
        let mut tokens: BTreeMap<TokenDigest, Scope> = BTreeMap::new();
        let mut add = |token: &str, scope: Scope| {
            let entry = tokens.entry(digest(token.as_bytes())).or_insert(scope);
            *entry = (*entry).max(scope);
        };
        for (scope, list) in [
            (Scope::Read, &settings.read_tokens),
            (Scope::Write, &settings.write_tokens),
        ] {
            for token in list.iter().filter(|t| !t.expose().is_empty()) {
                add(token.expose(), scope);
            }
        }
        if let Some(path) = settings.tokens_file() {
            for (token, scope) in read_tokens_file(path)? {
                add(&token, scope);
            }
        }
        let mut subjects: BTreeMap<String, Scope> = BTreeMap::new();
        for (scope, list) in [
            (Scope::Read, &settings.read_subjects),
            (Scope::Write, &settings.write_subjects),
        ] {
            for subject in list.iter().filter(|s| !s.is_empty()) {
                let entry = subjects.entry(subject.clone()).or_insert(scope);
                *entry = (*entry).max(scope);
            }
        }
        if tokens.is_empty() && subjects.is_empty() {
            bail!(
                "auth.enabled: no token or subject is configured, so every call would be refused"
            );
        }
        let needs_write: Vec<&str> = Method::ALL
            .into_iter()
            .filter(|m| Scope::needed_by(*m) == Scope::Write)
            .map(Method::name)
            .collect();
        tracing::info!(
            tokens = tokens.len(),
            subjects = subjects.len(),
            write_scope = ?needs_write,
            "authorization on: these RPCs need the write scope, the others of {} read",
            Method::SERVICE
        );
        Ok(Some(Arc::new(Authorizer {
            tokens: tokens.into_iter().collect(),
            subjects,
        })))
    }

    /// The scope of a presented token: every stored digest is compared, in
    /// constant time, whether or not one already matched.
    fn token_scope(&self, token: &[u8]) -> Option<Scope> {
        let presented = digest(token);
        let mut found = 0u8;
        for (stored, scope) in &self.tokens {
            // Digests are distinct, so at most one matches.
            found |= u8::conditional_select(&0, &(*scope as u8), stored.ct_eq(&presented));
        }
        Scope::from_code(found)
    }

    /// The largest scope mapped to any name of the verified client certificate.
    fn certificate_scope<B>(&self, request: &http::Request<B>) -> Option<Scope> {
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)?;
        let leaf = certs.first()?;
        subject_names(leaf)
            .iter()
            .filter_map(|name| self.subjects.get(name).copied())
            .max()
    }

    /// Ok if the call may go ahead; the refusal otherwise.
    pub(crate) fn authorize<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        // Health and reflection are not checked. A path under our service
        // that names no method needs `read`, so an unauthenticated caller
        // learns nothing about which methods exist.
        let (method, needed) = match Method::from_path(path) {
            Some(method) => (method.name(), Scope::needed_by(method)),
            None => match path.strip_prefix(Method::PATH_PREFIX) {
                Some(unknown) => (unknown, Scope::Read),
                None => return Ok(()),
            },
        };
        let token_scope = match bearer_token(request.headers())? {
            Some(token) => Some(
                self.token_scope(token)
                    .ok_or_else(|| Status::unauthenticated("the bearer token is not valid"))?,
            ),
            None => None,
        };
        let certificate_scope = if self.subjects.is_empty() {
            None
        } else {
            self.certificate_scope(request)
        };
        match token_scope.max(certificate_scope) {
            None => Err(Status::unauthenticated(
                "credentials required: send `authorization: Bearer TOKEN`",
            )),
            Some(scope) if scope >= needed => Ok(()),
            Some(scope) => Err(Status::permission_denied(format!(
                "{method} needs the {needed} scope; the credentials have {scope}"
            ))),
        }
    }
}

/// The token of an `authorization: Bearer TOKEN` header, if there is one.
fn bearer_token(headers: &http::HeaderMap) -> Result<Option<&[u8]>, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.as_bytes();
    let scheme = b"bearer ";
    if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return Err(Status::unauthenticated(
            "the authorization header is not `Bearer TOKEN`",
        ));
    }
    Ok(Some(value[scheme.len()..].trim_ascii()))
}

/// `read TOKEN` / `write TOKEN` lines; blank lines and `#` comments skipped.
fn read_tokens_file(path: &Path) -> anyhow::Result<Vec<(String, Scope)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("auth.tokens_file {}", path.display()))?;
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let place = || format!("auth.tokens_file {} line {}", path.display(), n + 1);
        let (scope, token) = match line.split_once(char::is_whitespace) {
            Some(("read", token)) => (Scope::Read, token.trim()),
            Some(("write", token)) => (Scope::Write, token.trim()),
            _ => bail!("{}: expected `read TOKEN` or `write TOKEN`", place()),
        };
        if let Err(why) = check_token(token) {
            bail!("{}: {why}", place());
        }
        tokens.push((token.to_owned(), scope));
    }
    Ok(tokens)
}

/// Refuses unauthorized UserManager calls before they reach the service;
/// passes everything through when authorization is off.
#[derive(Clone)]
pub(crate) struct AuthLayer {
    authorizer: Option<Arc<Authorizer>>,
}

impl AuthLayer {
    pub(crate) fn new(authorizer: Option<Arc<Authorizer>>) -> Self {
        Self { authorizer }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            authorizer: self.authorizer.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Auth<S> {
    inner: S,
    authorizer: Option<Arc<Authorizer>>,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(authorizer) = &self.authorizer
            && let Err(status) = authorizer.authorize(&request)
        {
            tracing::info!(
                path = request.uri().path(),
                code = ?status.code(),
                reason = status.message(),
                "call refused"
            );
            return Either::Right(ready(Ok(status.into_http())));
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn settings(read: &[&str], write: &[&str]) -> AuthSettings {
        AuthSettings {
            enabled: true,
            tokens_file: "".into(),
            read_tokens: read.iter().map(|t| Secret::from(*t)).collect(),
            write_tokens: write.iter().map(|t| Secret::from(*t)).collect(),
            read_subjects: Vec::new(),
            write_subjects: Vec::new(),
        }
    }

    fn call(path: &str, authorization: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::post(path);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request.body(()).unwrap()
    }

    #[test]
    fn a_token_listed_twice_keeps_its_largest_scope() {
        let token = "0123456789abcdef-both";
        let auth = Authorizer::from_settings(&settings(&[token], &[token]))
            .unwrap()
            .unwrap();
        assert_eq!(auth.token_scope(token.as_bytes()), Some(Scope::Write));
        assert_eq!(auth.token_scope(b"0123456789abcdef-none"), None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_anything_else_is_refused() {
        let auth = Authorizer::from_settings(&settings(&["read-token-0123456789"], &[]))
            .unwrap()
            .unwrap();
        let get = "/UserManager/GetUser";
        assert!(
            auth.authorize(&call(get, Some("bearer read-token-0123456789")))
                .is_ok()
        );
        for bad in ["Basic cmVhZA==", "Bearer", "read-token-0123456789"] {
            let status = auth.authorize(&call(get, Some(bad))).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        assert!(
            auth.authorize(&call("/grpc.health.v1.Health/Check", None))
                .is_ok()
        );
    }

    #[test]
    fn a_tokens_file_error_names_the_line_but_not_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            "# ops\nwrite good-token-0123456789\nadmin secret-token-0123456789\n",
        )
        .unwrap();
        let mut s = settings(&[], &[]);
        s.tokens_file = path.clone();
        let err = format!("{:#}", Authorizer::from_settings(&s).err().unwrap());
        assert!(err.contains("line 3"), "{err}");
        assert!(!err.contains("secret-token"), "{err}");
        std::fs::write(&path, "read short\n").unwrap();
        let err = format!("{:#}", Authorizer::from_settings(&s).err().unwrap());
        assert!(err.contains("line 1") && !err.contains("short"), "{err}");
    }
}
