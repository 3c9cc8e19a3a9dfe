//! The control socket: how `baton restart`, `status` and `stop` talk to a
//! running `baton run`.
//!
//! One request per connection: the client writes one JSON line
//! ([`Request`]), the server answers with one JSON line ([`Response`]) and
//! closes. The server side never lets a client wedge the supervisor: every
//! connection is served by its own task with a deadline for the request
//! line, requests are size-limited, concurrent connections are bounded, and
//! the supervisor only ever sees complete requests through a bounded channel.
//! A client that disconnects while waiting for a restart simply drops its
//! reply; the restart goes on.
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
            _ => {
                tokio::spawn(answer_and_close(stream, error("permission denied: not root or baton's user")));
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
    let mut line = serde_json::to_vec(&response).unwrap_or_default();
    line.push(b'\n');
    let _ = tokio::time::timeout(REQUEST_DEADLINE, stream.write_all(&line)).await;
}

async fn serve_client(stream: UnixStream, tx: mpsc::Sender<Incoming>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let request = match tokio::time::timeout(REQUEST_DEADLINE, reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') => serde_json::from_str::<Request>(&line),
        _ => return, // silent, slow, oversized or gone: nothing to do
    };
    let response = match request {
        Err(e) => error(&format!("bad request: {e}")),
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            // The upgrade's answer may come from the next program image,
            // which gets this duplicate (close-on-exec until then).
            let conn = match &request {
                Request::Upgrade { .. } => match reader.get_ref().get_ref().as_ref().as_fd().try_clone_to_owned() {
                    Ok(conn) => Some(conn),
                    Err(e) => {
                        let out = error(&format!("cannot keep the connection for the upgrade's answer: {e}"));
                        let mut line = serde_json::to_vec(&out).unwrap_or_default();
                        line.push(b'\n');
                        let _ = tokio::time::timeout(REQUEST_DEADLINE, write.write_all(&line)).await;
                        return;
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
                    _ = client_gone(&mut reader) => return,
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = tokio::time::timeout(REQUEST_DEADLINE, write.write_all(&out)).await;
}

/// Resolves when the client closes its end (or sends more than it should).
async fn client_gone<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) {
    let mut buf = [0u8; 64];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

/// Sends one request and waits for the answer (no timeout: a restart
/// takes as long as the app needs; the server bounds it).
pub async fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let proto = |reason: String| ControlError::Protocol { path: path.to_owned(), reason };
    let stream =
        UnixStream::connect(path).await.map_err(|source| ControlError::Connect { path: path.to_owned(), source })?;
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
