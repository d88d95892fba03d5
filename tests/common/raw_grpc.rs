//! A gRPC call over a raw HTTP/2 stream: no client library in between that
//! could enforce deadlines or fix up frames.

use std::net::SocketAddr;

/// The answer to a raw call: grpc-status and grpc-message (from headers or
/// trailers) and the raw response body.
pub struct RawReply {
    pub http_status: u16,
    pub grpc_status: Option<i32>,
    pub grpc_message: Option<String>,
    pub body: Vec<u8>,
}

/// Calls `path` with `body` sent as is (already framed, or deliberately
/// malformed); with `keep_open` the request stream is left open after it.
pub async fn raw_grpc_call(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
    body: bytes::Bytes,
    keep_open: bool,
) -> RawReply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra_headers {
        request = request.header(*k, *v);
    }
    let (response, mut send) = h2.send_request(request.body(()).unwrap(), false).unwrap();
    // The server may answer from the headers alone and end the stream
    // before the body is sent (an unknown method is UNIMPLEMENTED at once):
    // the body then has nowhere to go (h2's InactiveStreamId), and the
    // answer below, which every caller checks, is what counts.
    let _ = send.send_data(body, !keep_open);
    let response = response.await.unwrap();
    let http_status = response.status().as_u16();
    let header = |map: &http::HeaderMap, name: &str| {
        map.get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut grpc_status = header(response.headers(), "grpc-status");
    let mut grpc_message = header(response.headers(), "grpc-message");
    let mut recv = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    if let Some(trailers) = recv.trailers().await.unwrap() {
        grpc_status = grpc_status.or_else(|| header(&trailers, "grpc-status"));
        grpc_message = grpc_message.or_else(|| header(&trailers, "grpc-message"));
    }
    drop(send);
    RawReply {
        http_status,
        grpc_status: grpc_status.and_then(|s| s.parse().ok()),
        grpc_message,
        body,
    }
}

/// A call over its own raw HTTP/2 connection whose response body is read
/// only as the test asks: the server can send at most the stream's
/// flow-control window (65 535 bytes) beyond what the test has released.
pub struct RawStream {
    /// Keeps the connection open.
    pub connection: h2::client::SendRequest<bytes::Bytes>,
    pub body: h2::RecvStream,
}

impl RawStream {
    /// Calls `path` with `request` (framed) as the whole request stream.
    pub async fn open(addr: SocketAddr, path: &str, request: bytes::Bytes) -> Self {
        Self::open_with_window(addr, path, request, 65_535).await
    }

    /// [`RawStream::open`] with a stream and connection window of `window`
    /// bytes: a slow reader behind a small window keeps the stream sending.
    pub async fn open_with_window(
        addr: SocketAddr,
        path: &str,
        request: bytes::Bytes,
        window: u32,
    ) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut connection, driver) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(driver);
        let head = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut send) = connection.send_request(head, false).unwrap();
        send.send_data(request, true).unwrap();
        let body = response.await.unwrap().into_body();
        RawStream { connection, body }
    }

    /// Reads until `received` holds at least `len` bytes, releasing none of
    /// them; panics if the body ends first.
    pub async fn read_unreleased(&mut self, received: &mut Vec<u8>, len: usize) {
        while received.len() < len {
            match self.body.data().await {
                Some(data) => received.extend_from_slice(&data.unwrap()),
                None => panic!("the stream ended early: {:?}", self.body.trailers().await),
            }
        }
    }

    /// Releases `released` bytes read before, then reads the body to its
    /// end, releasing each chunk and calling `after_chunk` after it; returns
    /// the trailers.
    pub async fn read_to_end<F: Future<Output = ()>>(
        &mut self,
        released: usize,
        received: &mut Vec<u8>,
        mut after_chunk: impl FnMut() -> F,
    ) -> Option<http::HeaderMap> {
        let _ = self.body.flow_control().release_capacity(released);
        while let Some(chunk) = self.body.data().await {
            let chunk = chunk.unwrap();
            let _ = self.body.flow_control().release_capacity(chunk.len());
            received.extend_from_slice(&chunk);
            after_chunk().await;
        }
        self.body.trailers().await.unwrap()
    }
}
