//! A minimal socket-activated HTTP service on `baton-sd`.
//!
//! ```text
//! systemd-socket-activate -l 127.0.0.1:8080 --fdname=http target/release/examples/hello
//! curl http://127.0.0.1:8080/
//! ```
//!
//! It takes the socket named `http` (or binds 127.0.0.1:8080 itself when
//! started without socket activation), reports `READY=1` and a `STATUS=`
//! when run by a service manager, pings the watchdog if asked, and on
//! SIGTERM/SIGINT stops accepting and lets in-flight requests finish.

use std::sync::Arc;
use std::time::Duration;

use baton_sd::shutdown::{Drain, Shutdown};
use baton_sd::{ListenFds, Notifier, NotifyState, watchdog};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: single-threaded here; the runtime starts below.
    let fds = unsafe { ListenFds::from_env_and_unset() }?;
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(serve(fds))
}

async fn serve(mut fds: ListenFds) -> Result<(), Box<dyn std::error::Error>> {
    let listener = match fds.take_tokio_tcp_listener("http")? {
        Some(l) => l,
        None => tokio::net::TcpListener::bind("127.0.0.1:8080").await?,
    };
    let addr = listener.local_addr()?;
    let notifier = Notifier::from_env()?.map(Arc::new);
    let mut shutdown = Shutdown::install()?;
    let status = format!("serving http://{addr}/ as pid {}", std::process::id());
    eprintln!("hello: {status}");
    if let Some(n) = &notifier {
        n.notify(&[NotifyState::Ready, NotifyState::Status(&status)])?;
        if let Some(timeout) = watchdog::watchdog_timeout()? {
            watchdog::spawn_watchdog(Arc::clone(n), timeout);
        }
    }
    let drain = Drain::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let guard = drain.track();
                tokio::spawn(async move {
                    // Errors only affect this one client.
                    let _ = answer(stream).await;
                    drop(guard);
                });
            }
            (signal, _) = shutdown.wait(notifier.as_deref()) => {
                eprintln!("hello: {signal:?}, draining {} request(s)", drain.in_flight());
                break;
            }
        }
    }
    drop(listener);
    drain.wait_idle(Duration::from_secs(10)).await?;
    Ok(())
}

async fn answer(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut seen = 0;
    // Read the request head; the body (if any) is ignored.
    while !buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") && seen < buf.len() {
        let n = stream.read(&mut buf[seen..]).await?;
        if n == 0 {
            return Ok(());
        }
        seen += n;
    }
    let body = format!("hello from pid {}\n", std::process::id());
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
