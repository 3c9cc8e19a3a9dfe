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
}

/// Where the control socket of instance `name` lives by default:
/// `$RUNTIME_DIRECTORY/baton.sock` under systemd, else `/run/baton/NAME.sock`
/// for root, else `$XDG_RUNTIME_DIR/baton/NAME.sock` (or `/tmp/baton-UID/`).
pub fn default_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may list several directories separated by ':'.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_owned();
        return Path::new(&first).join(format!("{name}.sock"));
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from(format!("/run/baton/{name}.sock"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => Path::new(&dir).join("baton").join(format!("{name}.sock")),
        None => PathBuf::from(format!("/tmp/baton-{}/{name}.sock", uid.as_raw())),
    }
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
    accept: tokio::task::JoinHandle<()>,
    slots: Arc<Semaphore>,
}

impl ControlServer {
    /// Binds the control socket (mode 0600, parent created with 0700) and
    /// starts accepting; complete requests arrive on the returned channel.
    /// Refuses to steal the socket of a Baton that still answers.
    pub async fn start(path: &Path) -> Result<(ControlServer, mpsc::Receiver<Incoming>), ControlError> {
        let bind_err = |source| ControlError::Bind { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
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
        // Restrict the socket before anyone can connect: umask-independent.
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let (tx, rx) = mpsc::channel(MAX_CLIENTS);
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        let accept = tokio::spawn(accept_loop(listener, tx, Arc::clone(&slots)));
        Ok((ControlServer { path: path.to_owned(), accept, slots }, rx))
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

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<Incoming>, slots: Arc<Semaphore>) {
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
            if tx.send(Incoming { request, reply }).await.is_err() {
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
