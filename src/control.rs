//! The control socket: how `baton restart`, `status` and `stop` talk to a
//! running `baton run`.
//!
//! One request per connection: the client writes one JSON line
//! ([`Request`]), the server answers with one JSON line ([`Response`]) and
//! closes. The server side never lets a client wedge the supervisor: every
//! connection is served by its own task with a deadline for the request
//! line, requests are size-limited, concurrent connections are bounded, and
//! the supervisor only ever sees complete requests through a bounded channel.
//! A request too long, not UTF-8 or not complete within the deadline is
//! answered with an [`Response::Error`] naming the problem before the close.
//! The end of the client's stream also ends a request line, and a client
//! that half-closes its side after the request (`nc -N`, socat) still gets
//! its answer: only a connection closed in both directions is a client that
//! left. A client that disconnects while waiting for a restart simply drops
//! its reply; the restart goes on.
//!
//! `upgrade` is the one request whose answer may come from another program
//! image: the supervisor gets a duplicate of the client's connection with
//! the request ([`Incoming::conn`]), keeps it open across its `execve()`,
//! and the upgraded Baton writes the answer on it (see [`crate::upgrade`]).
//! The listening socket itself is shared with the supervisor
//! ([`ControlServer::listener_fd`]) so that it survives the exec too, and
//! clients connecting meanwhile wait in its backlog.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request line.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Concurrent control connections; more are answered "busy" at once.
pub const MAX_CLIENTS: usize = 128;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Start a new generation and retire the current one once it is ready.
    Restart {
        /// Wait for the outcome (default) or return once accepted.
        wait: bool,
    },
    /// Report the supervisor's state.
    Status,
    /// Stop every generation and exit.
    Stop,
    /// Replace Baton's own program image in place (same pid), keeping every
    /// socket and generation.
    Upgrade {
        /// The new binary; `None`: the path Baton was started from.
        #[serde(default)]
        binary: Option<PathBuf>,
    },
}

/// The answer to a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// A restart (or the restart covering this request) succeeded.
    Restarted(RestartDone),
    /// The restart covering this request failed; the previous generation
    /// keeps serving.
    RestartFailed(RestartFailure),
    /// The request was accepted (`--no-block`).
    Accepted,
    /// The supervisor's state.
    Status(Box<Status>),
    /// Baton is stopping.
    Stopping,
    /// Baton now runs the new binary, in the same process. Written by the
    /// upgraded image itself.
    Upgraded(UpgradeDone),
    /// The request could not be served.
    Error {
        /// Why.
        message: String,
    },
}

/// A successful restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestartDone {
    /// The new generation's number.
    pub generation: u64,
    /// Its main pid.
    pub pid: u32,
    /// Milliseconds from spawn to READY=1 (and a passing health check).
    pub ready_ms: u64,
    /// The generation it replaced, now draining.
    pub replaced: Option<u64>,
    /// Milliseconds from spawn until it took the traffic (readiness, quiet
    /// period, probes), when it was proven while another generation
    /// served; absent otherwise and from Batons without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_traffic_ms: Option<u64>,
    /// Milliseconds of its probation, until the old generation was asked
    /// to drain; absent with `took_traffic_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation_ms: Option<u64>,
}

/// A successful `upgrade`, as reported by the new program image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpgradeDone {
    /// Baton's pid: the same as before the upgrade.
    pub pid: u32,
    /// The version of the binary now running.
    pub version: String,
    /// The binary now running.
    pub binary: String,
    /// Upgrades this Baton has gone through (this one included).
    pub upgrades: u64,
    /// Milliseconds from the request reaching the old image to the new one
    /// being ready to serve control requests.
    pub elapsed_ms: u64,
    /// Generations adopted (running and draining).
    pub generations: usize,
}

/// A failed restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestartFailure {
    /// The generation that failed to start.
    pub generation: u64,
    /// What went wrong ("exited with status 3 before READY=1", …).
    pub reason: String,
    /// Its last `STATUS=`.
    pub status_text: Option<String>,
    /// The last lines it printed.
    #[serde(default)]
    pub log_tail: Vec<String>,
    /// The generation still serving, if any.
    pub serving: Option<u64>,
}

/// What `baton status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Status {
    /// Instance name.
    pub name: String,
    /// Baton's own pid.
    pub pid: u32,
    /// Seconds since Baton started.
    pub uptime_s: f64,
    /// Live generations, oldest first.
    pub generations: Vec<GenerationStatus>,
    /// Listening sockets held.
    pub sockets: Vec<SocketStatus>,
    /// Entries in the fd store.
    pub fdstore: usize,
    /// Successful restarts so far.
    pub restarts: u64,
    /// Restarts after a generation died on its own.
    pub crash_restarts: u64,
    /// The last failure (restart or crash), if any.
    pub last_failure: Option<String>,
    /// Whether a restart is running now.
    pub restarting: bool,
    /// Version of the running Baton binary.
    #[serde(default)]
    pub version: String,
    /// The binary the current program image was started from (also the
    /// default for `baton upgrade`), if known.
    #[serde(default)]
    pub binary: Option<String>,
    /// How often this Baton upgraded itself in place (`baton upgrade`).
    #[serde(default)]
    pub upgrades: u64,
    /// Seconds since the current program image started (equal to
    /// `uptime_s` until the first upgrade).
    #[serde(default)]
    pub image_uptime_s: f64,
    /// How the generations are started, checked, drained and replaced
    /// (`baton run`'s options, as carried across `baton upgrade`). Absent
    /// from Batons before it was reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::supervisor::Policy>,
}

/// One generation in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationStatus {
    /// Its number (1 for the first).
    pub generation: u64,
    /// Main pid.
    pub pid: u32,
    /// `starting`, `health-check`, `active` or `draining`.
    pub state: String,
    /// Last `STATUS=`.
    pub status_text: Option<String>,
    /// Seconds since it was spawned.
    pub uptime_s: f64,
    /// Milliseconds from spawn to READY=1.
    pub ready_ms: Option<u64>,
    /// Its probe listener's address (`host:port`), under `baton run
    /// --probe`; absent otherwise, and from Batons without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// While it is proven or on probation: its probes and the time left,
    /// e.g. `2 of 3 probes passed, quiet period 1.2s left`; absent
    /// otherwise, and from Batons without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proving: Option<String>,
    /// Which socket of each steered pair it accepts from (`a` or `b`), where
    /// Baton steers; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Whether new connections are steered to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub steered: bool,
}

/// One socket in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SocketStatus {
    /// Its `LISTEN_FDNAMES` name.
    pub name: String,
    /// Address, e.g. `tcp 127.0.0.1:8080`.
    pub local: String,
}

/// A request as the supervisor receives it, with the channel for its answer.
#[derive(Debug)]
pub struct Incoming {
    /// The request.
    pub request: Request,
    /// Where to send the answer; the client may be gone, which is fine.
    pub reply: oneshot::Sender<Response>,
    /// For [`Request::Upgrade`] only: a duplicate of the client's connection
    /// (close-on-exec), so the answer can come from the upgraded image. As
    /// long as the supervisor holds it, the client keeps waiting even if the
    /// old image's copy goes away.
    pub conn: Option<OwnedFd>,
}

/// Where the control socket of instance `name` lives by default:
/// `$RUNTIME_DIRECTORY/NAME.sock` under systemd, else `/run/baton/NAME.sock`
/// for root, else `$XDG_RUNTIME_DIR/baton/NAME.sock` (or `/tmp/baton-UID/`);
/// see [`crate::rundir::default_dir`].
pub fn default_path(name: &str) -> PathBuf {
    crate::rundir::default_dir().0.join(format!("{name}.sock"))
}

/// Errors of the control path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The socket could not be created.
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The socket's directory is unsafe (another user could replace the
    /// sockets in it) or could not be created.
    #[error(transparent)]
    RuntimeDir(#[from] crate::rundir::RundirError),
    /// Another Baton already serves this socket.
    #[error("another baton is already running with control socket {path}; stop it or pass --name/--control")]
    InUse {
        /// Socket path.
        path: PathBuf,
    },
    /// No Baton answers at the path.
    #[error("no baton is running at {path} ({source}); start one with `baton run`, or pass --name/--control")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The control socket exists but this user may not connect to it:
    /// a Baton may well be running there, as another user.
    #[error(
        "permission denied on the control socket {path} ({source}): it belongs to the user baton runs as; \
         run this command as that user or as root, or pass --control with a socket you may use"
    )]
    Denied {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The conversation failed.
    #[error("control socket {path}: {reason}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// The listening control socket. Removes its path when dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Shared with the accept task: pausing it (before an upgrade) must
    /// not close the socket.
    listener: Arc<UnixListener>,
    accept: tokio::task::JoinHandle<()>,
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<Incoming>,
}

impl ControlServer {
    /// Binds the control socket (mode 0600) and starts accepting; complete
    /// requests arrive on the returned channel. Its directory is created
    /// (0700) or checked first with [`crate::rundir::prepare`]: Baton's
    /// notify and handoff sockets go there too, and no other user may be
    /// able to replace them. Refuses to steal the socket of a Baton that
    /// still answers.
    pub async fn start(path: &Path) -> Result<(ControlServer, mpsc::Receiver<Incoming>), ControlError> {
        /// Baton's user only (root passes the peer check anyway).
        const SOCKET_MODE: u32 = 0o600;
        /// Clients connecting while the supervisor is busy wait here
        /// (tokio's own `UnixListener::bind` uses the same).
        const LISTEN_BACKLOG: i32 = 1024;
        let bind_err = |source| ControlError::Bind { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            crate::rundir::prepare(dir, crate::rundir::origin_of(dir))?;
        }
        if std::fs::symlink_metadata(path).is_ok() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ControlError::InUse { path: path.to_owned() });
            }
            // A stale socket from a Baton that died: safe to replace, but
            // never delete anything that is not a socket.
            use std::os::unix::fs::FileTypeExt;
            let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
            if !meta.file_type().is_socket() {
                return Err(bind_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        // Created 0600 by the bind itself: never a moment in which another
        // user could connect, and no chmod on a path.
        let socket = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| bind_err(e.into()))?;
        let addr = rustix::net::SocketAddrUnix::new(path).map_err(|e| bind_err(e.into()))?;
        crate::rundir::bind_with_mode(socket.as_fd(), &addr, SOCKET_MODE).map_err(bind_err)?;
        rustix::net::listen(&socket, LISTEN_BACKLOG).map_err(|e| bind_err(e.into()))?;
        let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(socket)).map_err(bind_err)?;
        Ok(Self::serve(path, listener))
    }

    /// Takes over a listening control socket handed over by the previous
    /// program image of this Baton (`baton upgrade`): `fd` must be a
    /// listening `AF_UNIX` stream socket bound at `path`. Must run inside a
    /// tokio runtime.
    pub fn adopt(path: &Path, fd: OwnedFd) -> Result<(ControlServer, mpsc::Receiver<Incoming>), ControlError> {
        let bind_err = |source| ControlError::Bind { path: path.to_owned(), source };
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = UnixListener::from_std(listener).map_err(bind_err)?;
        Ok(Self::serve(path, listener))
    }

    fn serve(path: &Path, listener: UnixListener) -> (ControlServer, mpsc::Receiver<Incoming>) {
        let (tx, rx) = mpsc::channel(MAX_CLIENTS);
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        let listener = Arc::new(listener);
        let accept = tokio::spawn(accept_loop(Arc::clone(&listener), tx.clone(), Arc::clone(&slots)));
        (ControlServer { path: path.to_owned(), listener, accept, slots, tx }, rx)
    }

    /// The listening socket's fd number, for handing it over across an
    /// `execve()`. It stays open for the server's whole life, paused or not.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_fd().as_raw_fd()
    }

    /// Stops accepting (new clients wait in the socket's backlog); clients
    /// already connected are still served. Undone by [`resume`](Self::resume).
    pub fn pause(&mut self) {
        self.accept.abort();
    }

    /// Accepts again after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        // Aborting a finished task is a no-op; never run two accept loops.
        self.accept.abort();
        self.accept = tokio::spawn(accept_loop(Arc::clone(&self.listener), self.tx.clone(), Arc::clone(&self.slots)));
    }

    /// Resolves once at most `busy` clients are still connected (being
    /// served or waiting for their answer). Cancel-safe.
    pub async fn settled(&self, busy: usize) {
        let want = MAX_CLIENTS.saturating_sub(busy) as u32;
        // The permits go back when dropped: this only waits.
        let _ = self.slots.acquire_many(want).await;
    }

    /// Stops accepting and waits (at most `grace`) until every client
    /// already connected has its answer — so `baton stop` hears "stopped"
    /// before the process exits.
    pub async fn shutdown(self, grace: Duration) {
        self.accept.abort();
        let _ = tokio::time::timeout(grace, self.slots.acquire_many(MAX_CLIENTS as u32)).await;
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: Arc<UnixListener>, tx: mpsc::Sender<Incoming>, slots: Arc<Semaphore>) {
    let own_uid = rustix::process::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tokio::spawn(answer_and_close(stream, error("too many control clients; try again")));
            continue;
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {}
            Ok(cred) => {
                let message = format!(
                    "permission denied: uid {} is neither root nor baton's user (uid {own_uid}); \
                     run the command as root or as uid {own_uid}",
                    cred.uid()
                );
                tokio::spawn(answer_and_close(stream, Response::Error { message }));
                continue;
            }
            Err(e) => {
                let message = format!("permission denied: cannot tell who is connecting ({e})");
                tokio::spawn(answer_and_close(stream, Response::Error { message }));
                continue;
            }
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            serve_client(stream, tx).await;
            drop(permit);
        });
    }
}

fn error(message: &str) -> Response {
    Response::Error { message: message.to_owned() }
}

async fn answer_and_close(mut stream: UnixStream, response: Response) {
    write_answer(&mut stream, &response).await;
}

/// Writes `response` as one line, giving up after [`REQUEST_DEADLINE`]
/// (a client that does not read must not hold its task forever).
async fn write_answer(stream: &mut UnixStream, response: &Response) {
    let mut line = serde_json::to_vec(response).unwrap_or_default();
    line.push(b'\n');
    let _ = tokio::time::timeout(REQUEST_DEADLINE, stream.write_all(&line)).await;
}

/// What reading a request line found.
#[derive(Debug, PartialEq, Eq)]
enum RequestLine {
    /// A line ended by `\n`: the client may still send (and close) later.
    Line(String),
    /// A line ended by the end of the client's stream: it half-closed its
    /// side (`nc -N`, socat, `printf … | …`) and waits for the answer.
    LineThenEof(String),
    /// Connected and closed without a byte (such as the liveness check of
    /// a starting Baton): nobody to answer.
    Empty,
}

/// Why a request line was refused; the client is told before the close.
#[derive(Debug, PartialEq, Eq)]
enum BadRequest {
    TooLong,
    NotUtf8,
    Unreadable(String),
}

impl BadRequest {
    fn message(&self) -> String {
        match self {
            BadRequest::TooLong => format!(
                "request longer than {MAX_REQUEST} bytes without a newline: a request is one JSON line, \
                 such as {{\"cmd\":\"status\"}}"
            ),
            BadRequest::NotUtf8 => "request is not UTF-8 text: send one JSON line, such as {\"cmd\":\"status\"}".into(),
            BadRequest::Unreadable(e) => format!("cannot read the request: {e}"),
        }
    }
}

/// Reads one request line, at most [`MAX_REQUEST`] bytes; the end of the
/// stream ends a line as well as `\n` does.
async fn read_request_line<R: tokio::io::AsyncRead + Unpin>(read: R) -> Result<RequestLine, BadRequest> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    reader.read_until(b'\n', &mut line).await.map_err(|e| BadRequest::Unreadable(e.to_string()))?;
    let ended_by_newline = line.last() == Some(&b'\n');
    if line.is_empty() {
        return Ok(RequestLine::Empty);
    }
    if !ended_by_newline && line.len() as u64 >= MAX_REQUEST {
        return Err(BadRequest::TooLong);
    }
    let text = String::from_utf8(line).map_err(|_| BadRequest::NotUtf8)?;
    Ok(if ended_by_newline { RequestLine::Line(text) } else { RequestLine::LineThenEof(text) })
}

async fn serve_client(mut stream: UnixStream, tx: mpsc::Sender<Incoming>) {
    let (line, half_closed) = match tokio::time::timeout(REQUEST_DEADLINE, read_request_line(&mut stream)).await {
        Ok(Ok(RequestLine::Line(line))) => (line, false),
        Ok(Ok(RequestLine::LineThenEof(line))) => (line, true),
        Ok(Ok(RequestLine::Empty)) => return,
        Ok(Err(bad)) => return write_answer(&mut stream, &error(&bad.message())).await,
        Err(_) => {
            let message = format!(
                "no complete request within {} s: send one JSON line ending in a newline, such as {{\"cmd\":\"status\"}}",
                REQUEST_DEADLINE.as_secs()
            );
            return write_answer(&mut stream, &error(&message)).await;
        }
    };
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => error(&format!("bad request: {e}")),
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            // The upgrade's answer may come from the next program image,
            // which gets this duplicate (close-on-exec until then).
            let conn = match &request {
                Request::Upgrade { .. } => match stream.as_fd().try_clone_to_owned() {
                    Ok(conn) => Some(conn),
                    Err(e) => {
                        let out = error(&format!("cannot keep the connection for the upgrade's answer: {e}"));
                        return write_answer(&mut stream, &out).await;
                    }
                },
                _ => None,
            };
            if tx.send(Incoming { request, reply, conn }).await.is_err() {
                error("baton is shutting down")
            } else {
                // Waits as long as the supervisor needs (a restart may take
                // the app's whole ready timeout); the supervisor always
                // answers or drops the sender when it exits.
                tokio::select! {
                    r = answer => r.unwrap_or(Response::Stopping),
                    // The client hung up: stop waiting, the work goes on.
                    _ = client_left(&mut stream, half_closed) => return,
                }
            }
        }
    };
    write_answer(&mut stream, &response).await;
}

/// Resolves when the client is gone: its connection fully closed, not merely
/// half-closed. A client that shut down its sending side after the request
/// (`nc -N`, socat at the end of its input) still waits for the answer, so
/// the end of its stream is not the end of the client: only `EPOLLHUP` (both
/// directions shut, which for `AF_UNIX` means the peer closed its socket) is.
/// Bytes after the request line are read and ignored.
async fn client_left(stream: &mut UnixStream, mut half_closed: bool) {
    let mut buf = [0u8; 256];
    while !half_closed {
        match stream.read(&mut buf).await {
            Ok(0) => half_closed = true,
            Ok(_) => continue,
            Err(_) => return,
        }
    }
    // Watched through a duplicate with its own registration: consuming
    // write readiness on `stream` itself would leave the answer's write
    // waiting for an edge that never comes.
    let watch = stream.as_fd().try_clone_to_owned().ok().and_then(|fd| {
        // SAFETY: `fd` is an `OwnedFd` moved into the AsyncFd, neither
        // closed nor replaced while the AsyncFd lives.
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::WRITABLE) }.ok()
    });
    let Some(watch) = watch else {
        // Cannot watch (EMFILE): wait for the answer as if it stayed.
        return std::future::pending().await;
    };
    loop {
        // Writability is level-true while the peer is there; what matters
        // is the hang-up, which tokio reports as "write closed".
        let Ok(mut ready) = watch.writable().await else { return };
        if ready.ready().is_write_closed() {
            return;
        }
        // Consume this readiness so the next wait lasts until the socket's
        // next state change (edge-triggered: no busy loop).
        ready.clear_ready();
    }
}

/// Sends one request and waits for the answer (no timeout: a restart
/// takes as long as the app needs; the server bounds it).
pub async fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let proto = |reason: String| ControlError::Protocol { path: path.to_owned(), reason };
    let stream = UnixStream::connect(path).await.map_err(|source| connect_error(path, source))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| proto(e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| proto(format!("sending the request: {e}")))?;
    let mut answer = String::new();
    BufReader::new(read.take(1 << 20))
        .read_line(&mut answer)
        .await
        .map_err(|e| proto(format!("reading the answer: {e}")))?;
    if answer.is_empty() {
        return Err(proto("baton closed the connection without answering".into()));
    }
    // Keep `write` alive until the answer arrived: closing it early would
    // look like a client that gave up.
    drop(write);
    serde_json::from_str(&answer).map_err(|e| proto(format!("unreadable answer {answer:?}: {e}")))
}

/// Tells "nobody there" from "not allowed": both fail `connect()`, but only
/// the first means no Baton runs at `path`.
fn connect_error(path: &Path, source: std::io::Error) -> ControlError {
    let path = path.to_owned();
    match source.kind() {
        std::io::ErrorKind::PermissionDenied => ControlError::Denied { path, source },
        _ => ControlError::Connect { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<RequestLine, BadRequest> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(read_request_line(bytes))
    }

    #[test]
    fn request_lines_end_with_a_newline_or_the_end_of_the_stream() {
        assert_eq!(read(b"{\"cmd\":\"status\"}\nmore"), Ok(RequestLine::Line("{\"cmd\":\"status\"}\n".into())));
        assert_eq!(read(b"{\"cmd\":\"status\"}"), Ok(RequestLine::LineThenEof("{\"cmd\":\"status\"}".into())));
        assert_eq!(read(b""), Ok(RequestLine::Empty));
    }

    #[test]
    fn too_long_and_not_utf8_requests_are_refused_with_the_limit_named() {
        let mut exact = vec![b' '; MAX_REQUEST as usize - 1];
        exact.push(b'\n');
        assert!(matches!(read(&exact), Ok(RequestLine::Line(_))));
        let long = vec![b'a'; MAX_REQUEST as usize + 1];
        assert_eq!(read(&long), Err(BadRequest::TooLong));
        assert!(BadRequest::TooLong.message().contains("4096 bytes"));
        assert_eq!(read(b"\xff\n"), Err(BadRequest::NotUtf8));
        assert!(BadRequest::NotUtf8.message().contains("not UTF-8"));
    }
}
