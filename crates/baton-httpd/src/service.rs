//! The request handler: `/healthz`, `/.well-known/baton` and static files.
//!
//! Every response carries [`PID_HEADER`] and [`GENERATION_HEADER`], so a
//! client (or a test) can tell which process and generation served it.
//!
//! The handler knows nothing of connections, draining or handoff: the same
//! [`Handler`] runs under plain hyper (see the benchmark) and under
//! `baton-httpd`'s handoff-aware connection driver ([`crate::conn`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use tokio::task::JoinHandle;

use crate::body::Body;
use crate::files::{self, FileRequest, Files};

/// Response header naming the serving process.
pub const PID_HEADER: HeaderName = HeaderName::from_static("baton-pid");
/// Response header naming the serving generation.
pub const GENERATION_HEADER: HeaderName = HeaderName::from_static("baton-generation");
/// Liveness endpoint: `200 ok` while the process serves.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Identity endpoint: JSON with pid, generation, start time, adopted connections.
pub const WELL_KNOWN_PATH: &str = "/.well-known/baton";

/// Who is serving: reported by `/.well-known/baton` and the identity headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// This process.
    pub pid: u32,
    /// This generation (see [`crate::generation`]).
    pub generation: u64,
    /// When the process started serving.
    pub started: SystemTime,
    /// Connections handed over by the previous generation and adopted at
    /// start; [`Handler::count_adopted`] adds those pushed later.
    pub adopted: u64,
}

impl Identity {
    /// The JSON document of `/.well-known/baton`.
    pub fn to_json(&self) -> serde_json::Value {
        let unix_ms = self.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        serde_json::json!({
            "pid": self.pid,
            "generation": self.generation,
            "started_at": httpdate::fmt_http_date(self.started),
            "started_at_unix_ms": unix_ms,
            "adopted_connections": self.adopted,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// The request handler; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Handler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    files: Files,
    identity: Identity,
    pid: HeaderValue,
    generation: HeaderValue,
    /// Adopted connections so far: at start, plus pushed ones.
    adopted: AtomicU64,
}

impl Handler {
    /// A handler serving `files`, stamping responses with `identity`.
    pub fn new(files: Files, identity: Identity) -> Self {
        let inner = Inner {
            pid: HeaderValue::from(identity.pid),
            generation: HeaderValue::from(identity.generation),
            adopted: AtomicU64::new(identity.adopted),
            files,
            identity,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Who this handler says is serving (`adopted` as at start).
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Counts `n` more adopted connections (handed over while running), for
    /// `/.well-known/baton`.
    pub fn count_adopted(&self, n: u64) {
        self.inner.adopted.fetch_add(n, Ordering::Relaxed);
    }

    /// Connections adopted so far.
    pub fn adopted(&self) -> u64 {
        self.inner.adopted.load(Ordering::Relaxed)
    }

    /// The JSON document of `/.well-known/baton`, as of now.
    pub fn well_known(&self) -> serde_json::Value {
        Identity { adopted: self.adopted(), ..self.inner.identity.clone() }.to_json()
    }

    /// Answers one request. The request body is never read: only `GET` and
    /// `HEAD` are served. Must be called inside a tokio runtime (file lookups
    /// run on its blocking pool).
    pub fn handle<B>(&self, req: Request<B>) -> ResponseFuture {
        let method = req.method();
        if method != Method::GET && method != Method::HEAD {
            let mut r = files::text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are served\n".into());
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return self.ready(r);
        }
        match req.uri().path() {
            HEALTHZ_PATH => {
                let mut r = files::text(StatusCode::OK, "ok\n".into());
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                self.ready(self.head_strip(method, r))
            }
            WELL_KNOWN_PATH => {
                // Built per request (the adopted count changes); this
                // endpoint is not on any hot path.
                let mut r = Response::new(Body::full(Bytes::from(self.well_known().to_string() + "\n")));
                let h = r.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                self.ready(self.head_strip(method, r))
            }
            path => {
                let file_req = FileRequest {
                    method: method.clone(),
                    path: path.to_owned(),
                    query: req.uri().query().map(str::to_owned),
                    if_modified_since: files::if_modified_since(req.headers()),
                };
                let inner = Arc::clone(&self.inner);
                let task = tokio::task::spawn_blocking(move || {
                    let mut r = inner.files.respond(&file_req);
                    inner.stamp(&mut r);
                    r
                });
                ResponseFuture { state: State::Blocking(task, Arc::clone(&self.inner)) }
            }
        }
    }

    fn ready(&self, mut r: Response<Body>) -> ResponseFuture {
        self.inner.stamp(&mut r);
        ResponseFuture { state: State::Ready(Some(r)) }
    }

    /// For `HEAD`, the same headers (Content-Length included) without a body.
    fn head_strip(&self, method: &Method, r: Response<Body>) -> Response<Body> {
        if method != Method::HEAD {
            return r;
        }
        let (mut parts, body) = r.into_parts();
        let len = hyper::body::Body::size_hint(&body).exact().unwrap_or(0);
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        Response::from_parts(parts, Body::empty())
    }
}

impl Inner {
    fn stamp(&self, r: &mut Response<Body>) {
        let h = r.headers_mut();
        h.insert(PID_HEADER, self.pid.clone());
        h.insert(GENERATION_HEADER, self.generation.clone());
    }
}

impl<B> hyper::service::Service<Request<B>> for Handler {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<B>) -> ResponseFuture {
        self.handle(req)
    }
}

/// The future of one response: ready at once, or waiting for a file lookup
/// on the blocking pool. `Unpin`, as hyper's `poll_without_shutdown` needs.
#[derive(Debug)]
pub struct ResponseFuture {
    state: State,
}

// The ready response is stored inline: boxing it would cost an allocation
// per request to save a few hundred bytes in a future that exists once per
// request in flight.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum State {
    Ready(Option<Response<Body>>),
    Blocking(JoinHandle<Response<Body>>, Arc<Inner>),
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            State::Ready(r) => Poll::Ready(Ok(r.take().unwrap_or_else(files::internal))),
            State::Blocking(task, inner) => match Pin::new(task).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(r)) => Poll::Ready(Ok(r)),
                Poll::Ready(Err(e)) => {
                    tracing::error!(error = %e, "file lookup task failed");
                    let mut r = files::internal();
                    inner.stamp(&mut r);
                    Poll::Ready(Ok(r))
                }
            },
        }
    }
}
