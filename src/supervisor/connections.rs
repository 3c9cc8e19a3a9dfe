//! Connections a generation stores (`FDSTORE=1` with `FDNAME=connection`):
//! moved straight to the active generation over its handoff connection,
//! else kept in the fd store (and systemd's) until one can take them.

use super::*;

impl Supervisor {
    /// Sends connections a generation stored straight to generation `to`
    /// (the core's [`Action::PushConnections`]); what cannot be sent now
    /// waits in the store and is moved shortly.
    pub(super) fn push_connections(&mut self, name: &str, fds: Vec<ReceivedFd>, poll: bool, to: u64) {
        let Some(conn) = self.procs(to).and_then(|p| p.handoff.as_ref()) else {
            return self.store_fds(name, fds, poll);
        };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        match crate::handoff::push(conn, name, &borrowed) {
            Ok(()) => {
                tracing::debug!(
                    event = "handoff",
                    generation = to,
                    count = fds.len(),
                    mono_us = baton_sd::monotonic_usec(),
                    "moved {} fd(s) to generation {to}",
                    fds.len()
                );
                // Our copies, in one message to the closer.
                crate::closer::discard_all(fds);
            }
            Err((sent, e)) => {
                tracing::warn!(
                    event = "handoff-deferred",
                    generation = to,
                    "cannot move connections to generation {to} now: {e}; storing them and retrying"
                );
                // Those sent are the receiver's now; the rest wait in the
                // store and are moved by `flush_connections` shortly.
                let mut fds = fds;
                let rest: Vec<ReceivedFd> = fds.split_off(sent);
                crate::closer::discard_all(fds);
                self.store_fds(name, rest, poll);
                self.blocked(to, &e);
            }
        }
    }

    /// Moves stored connections generation `to` has not seen yet to it
    /// (after a full handoff socket, or when it connected late); the core
    /// retries on a timer while the socket is full.
    pub(super) fn flush_connections(&mut self, to: u64) {
        let Some(active) = self.procs(to) else { return };
        let Some(conn) = &active.handoff else { return };
        let pending: Vec<(std::os::fd::RawFd, BorrowedFd<'_>)> = self
            .store
            .entries()
            .filter(|(name, fd)| {
                baton_sd::StoredName::parse(name) == baton_sd::StoredName::Connection
                    && !active.passed.contains(&std::os::fd::AsRawFd::as_raw_fd(fd))
            })
            .map(|(_, fd)| (std::os::fd::AsRawFd::as_raw_fd(&fd), fd))
            .collect();
        if pending.is_empty() {
            return;
        }
        let fds: Vec<BorrowedFd<'_>> = pending.iter().map(|(_, fd)| *fd).collect();
        let (sent, failed) = match crate::handoff::push(conn, baton_sd::fdstore::CONNECTION, &fds) {
            Ok(()) => (fds.len(), None),
            Err((sent, e)) => (sent, Some(e)),
        };
        let moved: Vec<std::os::fd::RawFd> = pending[..sent].iter().map(|(raw, _)| *raw).collect();
        if !moved.is_empty() {
            tracing::info!(
                event = "handoff",
                generation = to,
                count = moved.len(),
                "moved {} stored connection(s) to generation {to}",
                moved.len()
            );
            self.store.remove_raw(&moved);
            self.tidy_vault();
            // They were also kept in systemd's store for a crash of ours;
            // once none is left here, drop them there too.
            if !self.store.entries().any(|(n, _)| baton_sd::StoredName::parse(n) == baton_sd::StoredName::Connection) {
                let upstream_name = format!("app/{}", baton_sd::fdstore::CONNECTION);
                self.upstream_notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&upstream_name)]);
            }
        }
        if let Some(e) = failed {
            tracing::debug!(event = "handoff-deferred", generation = to, "{e}; retrying");
            self.blocked(to, &e);
        }
    }

    /// A push to generation `to` failed with `e`: the core retries on a
    /// timer, and a full socket (`EAGAIN`) is also watched for room, so
    /// that the rest moves as soon as the generation has read what came
    /// before: the generation is then the one pacing a handover, not the
    /// timer (a 50 ms wait each time it fell behind cost up to a second
    /// for 19,800 connections, `cargo bench --bench idle_handover`).
    fn blocked(&mut self, to: u64, e: &std::io::Error) {
        if e.kind() == std::io::ErrorKind::WouldBlock && self.handoff_watch.is_none() {
            let watch = self.procs(to).and_then(|p| p.handoff.as_ref()).map(|conn| {
                // A copy: the watch must not outlive what it registered.
                let copy = rustix::io::fcntl_dupfd_cloexec(conn, 0)?;
                // SAFETY: `copy` is an OwnedFd moved into the AsyncFd and
                // neither closed nor replaced while it is registered.
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(copy, tokio::io::Interest::WRITABLE) }
                    .map_err(std::io::Error::from)
            });
            match watch {
                Some(Ok(w)) => self.handoff_watch = Some(w),
                Some(Err(e)) => tracing::debug!(event = "handoff-deferred", "cannot watch the handoff socket: {e}"),
                None => {}
            }
        }
        self.feed(Input::HandoffBlocked);
    }

    pub(super) fn on_handoff_peer(&mut self, peer: crate::handoff::Peer) {
        let generation = peer.pid.and_then(|pid| {
            let known = |p: &&mut Procs| self.core.generation(p.number).is_some();
            self.procs.iter_mut().filter(known).find(|p| p.is_main(pid) || p.child.pid == pid)
        });
        match generation {
            Some(p) => {
                p.handoff = Some(peer.conn);
                let generation = p.number;
                // It may have become active (READY=1) before we saw it connect.
                self.feed(Input::HandoffConnected { generation });
            }
            // Dropping `peer.conn` releases whatever the peer queued in it,
            // on the closer thread.
            None if !self.refusals.allow(Refused::Handoff, peer.pid) => {}
            None => match peer.pid {
                Some(pid) => tracing::warn!(
                    event = "handoff-refused",
                    sender = pid,
                    "handoff connection from pid {pid} refused: not a generation's main process"
                ),
                None => tracing::warn!(
                    event = "handoff-refused",
                    uid = peer.uid,
                    "handoff connection from uid {} refused: its pid is not visible in Baton's PID namespace, so it \
                     is no generation of Baton's; run the app in Baton's PID namespace (or one below it)",
                    peer.uid
                ),
            },
        }
    }

    pub(super) fn store_fds(&mut self, name: &str, fds: Vec<ReceivedFd>, poll: bool) {
        // Forward first (the store takes ownership): under systemd, the
        // store must survive Baton itself. The `app/` prefix tells the next
        // Baton which entries are the app's.
        // Connections, which come by the thousand, go into one vault there
        // instead (see `crate::vault`).
        if let Some(up) = &self.upstream {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            let poll = if poll { FdPoll::Poll } else { FdPoll::NoPoll };
            if name == baton_sd::fdstore::CONNECTION {
                self.keep_in_vault(&borrowed);
            } else if let Err(e) = up.store_fds(&format!("app/{name}"), &borrowed, poll) {
                tracing::warn!(event = "fdstore-forward-failed", name, "cannot forward to systemd's fd store: {e}");
            }
        }
        if let Err(e) = self.store.add_received(name, fds, poll) {
            tracing::warn!(event = "fdstore-full", name, "{e}");
        }
    }
}

impl Supervisor {
    /// Copies connections entering the store into the vault (a new one if
    /// none is open).
    fn keep_in_vault(&mut self, fds: &[BorrowedFd<'_>]) {
        let Some(up) = &self.upstream else { return };
        let kept = match &mut self.vault {
            Some(vault) => vault.append(fds),
            None => {
                self.vault_serial += 1;
                crate::vault::Vault::create(up, self.vault_serial, fds).map(|v| self.vault = Some(v))
            }
        };
        if let Err(e) = kept {
            tracing::warn!(
                event = "vault-failed",
                count = fds.len(),
                "cannot keep {} connection(s) in systemd's fd store for a crash of baton: {e}; baton holds them, \
                 a crash of baton would close them",
                fds.len()
            );
        }
    }

    /// After connections left the store: rebuilds the vault once it holds
    /// mostly gone ones, drops it once none is left ([`crate::vault::next_step`]).
    pub(super) fn tidy_vault(&mut self) {
        let Some(vault) = &self.vault else { return };
        match crate::vault::next_step(vault.held(), self.store.connections()) {
            crate::vault::Step::Keep => {}
            crate::vault::Step::Drop => {
                if let Some(old) = self.vault.take() {
                    self.upstream_notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(old.name())]);
                }
            }
            crate::vault::Step::Rebuild => self.rebuild_vault(),
        }
    }

    /// A new vault with the store's connections, stored before the old one
    /// is removed: a crash in between leaves both, never neither.
    fn rebuild_vault(&mut self) {
        let Some(up) = &self.upstream else { return };
        let live: Vec<BorrowedFd<'_>> =
            self.store.entries().filter(|(name, _)| *name == baton_sd::fdstore::CONNECTION).map(|(_, fd)| fd).collect();
        if live.is_empty() {
            return;
        }
        self.vault_serial += 1;
        match crate::vault::Vault::create(up, self.vault_serial, &live) {
            Ok(new) => {
                tracing::debug!(event = "vault-rebuilt", count = new.held(), "vault rebuilt as {}", new.name());
                if let Some(old) = self.vault.replace(new) {
                    self.upstream_notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(old.name())]);
                }
            }
            // The old vault still holds every live connection.
            Err(e) => {
                tracing::warn!(event = "vault-failed", "cannot rebuild the connection vault: {e}; keeping the old one")
            }
        }
    }

    /// At start: the connections recovered from an earlier Baton's vaults
    /// (`names`, already in the store) go into a vault of ours; then those
    /// vaults are removed from systemd's store.
    pub(super) fn adopt_vaults(&mut self, names: &[String]) {
        if self.store.connections() > 0 {
            self.rebuild_vault();
        }
        for name in names {
            self.upstream_notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
        }
    }
}
