//! Load shedding: calls over the per-connection or server-wide bounds are
//! refused at once with RESOURCE_EXHAUSTED, never queued.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{
    Status,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use crate::{
    config::LimitsSettings,
    instruments::{self, Limit},
};

/// The bounds, and what is in flight under them.
pub(super) struct Shedder {
    /// Server-wide: one permit per open streaming call.
    open_streams: Arc<Semaphore>,
    max_open_streams: usize,
    per_connection: Arc<PerConnection>,
}

impl Shedder {
    pub(super) fn new(limits: &LimitsSettings) -> Self {
        Self {
            open_streams: Arc::new(Semaphore::new(limits.max_open_streams)),
            max_open_streams: limits.max_open_streams,
            per_connection: Arc::new(PerConnection {
                limit: limits.max_calls_per_connection,
                in_flight: Mutex::default(),
            }),
        }
    }

    /// The permits of a new call, or why it is shed.
    pub(super) fn admit(
        &self,
        extensions: &http::Extensions,
        streaming: bool,
    ) -> Result<Permits, Status> {
        let connection = match connection_key(extensions) {
            Some(key) => Some(self.per_connection.enter(key).ok_or_else(|| {
                instruments::get().limit_refused(Limit::MaxCallsPerConnection);
                Status::resource_exhausted(format!(
                    "too many calls in flight on this connection (at most {}); \
                     retry later or spread calls over more connections",
                    self.per_connection.limit
                ))
            })?),
            None => None,
        };
        let stream = if streaming {
            Some(self.open_streams.clone().try_acquire_owned().map_err(|_| {
                instruments::get().limit_refused(Limit::MaxOpenStreams);
                Status::resource_exhausted(format!(
                    "too many open streams on this server (at most {}); retry later",
                    self.max_open_streams
                ))
            })?)
        } else {
            None
        };
        Ok(Permits {
            _connection: connection,
            _stream: stream,
        })
    }
}

/// Identifies a connection by its two ends, whether TLS or not.
type ConnectionKey = (Option<SocketAddr>, Option<SocketAddr>);

fn connection_key(extensions: &http::Extensions) -> Option<ConnectionKey> {
    let tcp = extensions.get::<TcpConnectInfo>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .map(TlsConnectInfo::get_ref)
    })?;
    Some((tcp.local_addr, tcp.remote_addr))
}

/// Calls in flight per connection. tonic's own per-connection limit holds
/// its permit only until the response headers, so it never counts a stream.
/// Ordered, not hashed: with one entry per open connection a lookup is a few
/// address comparisons, where SipHash over both addresses cost every call
/// about 1k instructions each way (callgrind), and no client can choose
/// addresses that collide.
struct PerConnection {
    limit: usize,
    in_flight: Mutex<BTreeMap<ConnectionKey, usize>>,
}

impl PerConnection {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<ConnectionKey, usize>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn enter(self: &Arc<Self>, key: ConnectionKey) -> Option<ConnectionPermit> {
        let mut in_flight = self.lock();
        let calls = in_flight.entry(key).or_default();
        if *calls >= self.limit {
            return None;
        }
        *calls += 1;
        Some(ConnectionPermit {
            table: self.clone(),
            key,
        })
    }
}

struct ConnectionPermit {
    table: Arc<PerConnection>,
    key: ConnectionKey,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut in_flight = self.table.lock();
        if let Some(calls) = in_flight.get_mut(&self.key) {
            *calls -= 1;
            if *calls == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

/// What a call holds until its response ends, is dropped, or stalls.
pub(super) struct Permits {
    _connection: Option<ConnectionPermit>,
    _stream: Option<OwnedSemaphorePermit>,
}
