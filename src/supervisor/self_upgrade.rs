//! `baton upgrade`, the supervisor's side: when it may happen, the probe,
//! quiescing, and the exec ([`crate::upgrade`]).

use super::*;

impl Supervisor {
    /// `baton upgrade`: the core says whether Baton is busy
    /// ([`Action::RefuseUpgrade`]) or the new binary is probed
    /// ([`Action::ProbeUpgrade`]).
    pub(super) fn request_upgrade(
        &mut self,
        binary: Option<PathBuf>,
        reply: oneshot::Sender<Response>,
        conn: Option<OwnedFd>,
    ) {
        self.upgrade_request = Some(UpgradeRequest { binary, reply, conn });
        self.feed(Input::UpgradeRequested);
        // Answered by the action it led to; this is never left over.
        self.upgrade_request = None;
    }

    /// Refuses the upgrade asked just now, or the one probed.
    pub(super) fn refuse_upgrade(&mut self, message: String) {
        let reply = match self.upgrade_request.take() {
            Some(request) => Some(request.reply),
            None => self.upgrading.take().map(|up| up.reply),
        };
        if let Some(reply) = reply {
            let _ = reply.send(Response::Error { message });
        }
    }

    /// Starts probing the binary asked for (the core's
    /// [`Action::ProbeUpgrade`]).
    pub(super) fn probe_upgrade(&mut self) {
        let Some(UpgradeRequest { binary, reply, conn }) = self.upgrade_request.take() else { return };
        let binary = match binary.or_else(|| self.image.binary.clone()) {
            None => Err(UpgradeError::NoDefaultBinary.to_string()),
            Some(b) if !b.is_absolute() => Err(UpgradeError::RelativeBinary { path: b }.to_string()),
            Some(b) => Ok(b),
        };
        let binary = match binary {
            Ok(b) => b,
            Err(message) => {
                let _ = reply.send(Response::Error { message });
                return self.feed(Input::UpgradeAbandoned);
            }
        };
        tracing::info!(event = "upgrade-requested", binary = %binary.display(), "checking {} before upgrading", binary.display());
        // The probe runs beside the supervisor, which keeps serving; the
        // outcome comes back to `on_probe`.
        let (tx, rx) = oneshot::channel();
        let path = binary.clone();
        tokio::spawn(async move {
            let _ = tx.send(upgrade::probe(&path, upgrade::PROBE_TIMEOUT).await);
        });
        self.upgrading = Some(PendingUpgrade {
            reply,
            conn,
            binary,
            requested: Instant::now(),
            probe: Some(rx),
            format: upgrade::STATE_FORMAT,
        });
    }

    pub(super) fn on_probe(&mut self, probed: Result<ProbeInfo, UpgradeError>) {
        let Some(mut up) = self.upgrading.take() else { return };
        up.probe = None;
        match probed {
            Err(e) => {
                tracing::warn!(event = "upgrade-refused", "{e}");
                let _ = up.reply.send(Response::Error { message: e.to_string() });
                self.feed(Input::UpgradeProbed { ok: false });
            }
            Ok(info) => {
                // `probe` refused a binary with no format in common.
                up.format = info.format_to_write().unwrap_or(upgrade::STATE_FORMAT);
                let binary = up.binary.display().to_string();
                // Executed at the top of the run loop, which owns the
                // control channel, unless a restart began while probing
                // (the core refuses it then).
                self.upgrading = Some(up);
                self.feed(Input::UpgradeProbed { ok: true });
                if self.upgrading.is_some() {
                    tracing::info!(
                        event = "upgrade-probed",
                        version = %info.version,
                        "{binary} is baton {}; upgrading",
                        info.version
                    );
                }
            }
        }
    }

    /// Answers a control request that arrives while the exec is being
    /// prepared: status as usual, anything else "retry".
    pub(super) fn answer_while_upgrading(&mut self, incoming: Incoming) {
        let response = match incoming.request {
            Request::Status => Response::Status(Box::new(self.status())),
            _ => Response::Error {
                message: "busy: baton is upgrading itself to a new binary right now; retry in a moment".into(),
            },
        };
        let _ = incoming.reply.send(response);
    }

    pub(super) fn fail_upgrade(&mut self, up: PendingUpgrade, message: String) {
        tracing::error!(event = "upgrade-failed", "{message}");
        self.feed(Input::UpgradeAbandoned);
        // Signals that came meanwhile are delivered now, to the run loop.
        upgrade::unblock_handled_signals();
        if let Some(server) = &mut self.control {
            server.resume();
        }
        let _ = up.reply.send(Response::Error { message });
    }

    /// Quiesces, hands the state over and re-executes. Returns only if the
    /// upgrade did not happen (the client got the reason).
    ///
    /// `signals` are the run loop's SIGHUP, SIGTERM and SIGINT streams: from
    /// here on those signals are blocked, so they stay pending in the kernel
    /// and survive the exec (or are delivered when the upgrade fails); one
    /// that tokio's handler already took before is found on the streams and
    /// cancels the upgrade instead of being lost with this image.
    pub(super) async fn execute_upgrade(
        &mut self,
        control: &mut mpsc::Receiver<Incoming>,
        signals: [&mut tokio::signal::unix::Signal; 3],
    ) {
        let Some(up) = self.upgrading.take() else { return };
        upgrade::block_handled_signals();
        if let Some(server) = &mut self.control {
            server.pause();
        }
        // Clients already connected get their answers first (at most the
        // grace): their connections die with this image. The upgrade's own
        // client is the one allowed to stay.
        let grace = tokio::time::sleep(UPGRADE_QUIESCE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                Some(incoming) = control.recv() => self.answer_while_upgrading(incoming),
                _ = settled(&self.control) => break,
                _ = &mut grace => break,
            }
        }
        while let Ok(incoming) = control.try_recv() {
            self.answer_while_upgrading(incoming);
        }
        // A signal that reached tokio's handler before the block above is in
        // its pipe: one pass of the driver (yield) moves it to the streams.
        tokio::task::yield_now().await;
        let [hup, term, int] = signals;
        // The flag as well: it is set by the handler itself, whatever the
        // driver has done since (see `crate::stop_signal`).
        let (stop, restart) = (taken(term) | taken(int) | crate::stop_signal::arrived(), taken(hup));
        if stop || restart {
            let what = if stop { "baton is stopping" } else { "a restart was requested (SIGHUP)" };
            self.fail_upgrade(up, format!("busy: {what}; nothing was changed"));
            if stop {
                self.begin_stop(None);
            } else {
                self.request_restart(None);
            }
            return;
        }
        // Exits already reaped are known only to this image: apply them.
        while let Some(exit) = self.reaper.try_next() {
            self.on_exit(exit.pid, &exit.status);
        }
        let mut peers = Vec::new();
        if let Some((_, rx)) = &mut self.handoff {
            while let Ok(peer) = rx.try_recv() {
                peers.push(peer);
            }
        }
        for peer in peers {
            self.on_handoff_peer(peer);
        }
        if let Some(reason) = self.core.busy() {
            let message = format!("busy: {reason}; nothing was changed, retry `baton upgrade` once it is over");
            return self.fail_upgrade(up, message);
        }
        let state = match self.handover(&up) {
            Ok(state) => state,
            Err(e) => return self.fail_upgrade(up, e.to_string()),
        };
        let status = format!("upgrading baton in place to {}", up.binary.display());
        self.upstream_notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now(),
            NotifyState::Status(&status),
        ]);
        tracing::info!(
            event = "upgrade-exec",
            binary = %up.binary.display(),
            generations = self.core.generations().len(),
            prepare_ms = up.requested.elapsed().as_millis() as u64,
            "re-executing {} with {} generation(s), {} socket(s), {} stored fd(s)",
            up.binary.display(),
            self.core.generations().len(),
            self.cfg.sockets.len(),
            self.store.len()
        );
        // execve() would close the fds queued for the closer on this thread.
        crate::closer::close_queued_without_lingering();
        // Only returns if the exec failed; everything is as before.
        let e = upgrade::exec(&up.binary, &self.image.argv, &state, self.image.exe.as_deref().map(|e| e.as_fd()));
        let status =
            format!("upgrade failed; {}", self.serving_status().unwrap_or_else(|| "no generation serving".into()));
        self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.fail_upgrade(up, e.to_string());
    }
}

/// The probe's outcome, or never when no upgrade is being probed.
pub(super) async fn probe_result(upgrading: &mut Option<PendingUpgrade>) -> Result<ProbeInfo, UpgradeError> {
    match upgrading.as_mut().and_then(|u| u.probe.as_mut()) {
        Some(rx) => rx.await.unwrap_or_else(|_| {
            Err(UpgradeError::Exec {
                context: "probing the new binary",
                source: std::io::Error::other("the probe task ended without an answer"),
            })
        }),
        None => std::future::pending().await,
    }
}

/// Whether `signal` was received (without waiting).
pub(super) fn taken(signal: &mut tokio::signal::unix::Signal) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(signal.poll_recv(&mut cx), std::task::Poll::Ready(Some(())))
}

/// Resolves once at most one control client (the upgrade's) is connected.
pub(super) async fn settled(control: &Option<ControlServer>) {
    if let Some(server) = control {
        server.settled(1).await;
    }
}
