//! `baton upgrade`'s state: what this image hands over ([`Handover`]) and
//! how the next image adopts it, taking over every fd it names.

use super::*;

impl Supervisor {
    /// The state to hand over; every fd it names is owned by `self` and
    /// stays open while `self` lives.
    pub(super) fn handover(&self, up: &PendingUpgrade) -> Result<Handover, UpgradeError> {
        let cfg = &self.cfg;
        let counters = self.core.counters();
        // The new image rebuilds the app's command from its command line
        // (see `adopt`): make sure that works now, rather than after the
        // exec.
        if let Some((program, args)) = cfg.command_line.split_first()
            && let Err(e) = AppCommand::new(program, args)
            && AppCommand::new(cfg.command.program().as_os_str(), args).is_err()
        {
            return Err(UpgradeError::AppProgram { program: program.into(), reason: e.to_string() });
        }
        let control = self.control.as_ref().ok_or_else(|| UpgradeError::Exec {
            context: "handing over the control socket",
            source: std::io::Error::other("this supervisor has no control socket"),
        })?;
        let gens = self.core.generations();
        let mut generations = Vec::with_capacity(gens.len());
        for g in gens {
            let p = self.procs(g.number).ok_or_else(|| UpgradeError::Exec {
                context: "handing over the generations",
                source: std::io::Error::other(format!("generation {} has no processes", g.number)),
            })?;
            let (state, kill_at, killed) = match g.life.state {
                State::Active => ("active", None, false),
                State::Draining { kill_at, killed } => ("draining", Some(upgrade::to_mono(kill_at)), killed),
                _ => {
                    return Err(UpgradeError::Exec {
                        context: "handing over the generations",
                        source: std::io::Error::other(format!("generation {} is {}", g.number, g.state_name())),
                    });
                }
            };
            generations.push(upgrade::GenerationState {
                number: g.number,
                pid: p.child.pid,
                pidfd: p.child.pidfd.as_raw_fd(),
                main_pid: p.main_pid(),
                main_pidfd: p.main.as_ref().filter(|m| m.is_alive()).map(|m| m.pidfd().as_raw_fd()),
                state: state.into(),
                kill_at_mono_us: kill_at,
                killed,
                spawned_mono_us: upgrade::to_mono(g.spawned_at),
                ready_mono_us: g.ready_at.map(upgrade::to_mono),
                status_text: g.status_text.clone(),
                watchdog: g.life.watchdog,
                last_ping_mono_us: upgrade::to_mono(g.life.last_ping),
                output: p.output.kind(),
                output_fd: p.output.pipe_fd(),
                output_lines: p.output.lines(),
                output_unwritten: p.output.unwritten(),
                handoff: p.handoff.as_ref().map(|h| h.as_raw_fd()),
                passed: p.passed.clone(),
                probe: p.probe.as_ref().map(|x| x.fd.as_raw_fd()),
                slot: match g.slot {
                    Slot::A => 0,
                    Slot::B => 1,
                },
            });
        }
        let supervisor = upgrade::SupervisorState {
            name: cfg.name.clone(),
            app_argv: cfg.command_line.iter().map(|a| upgrade::os_bytes(a)).collect(),
            app_program: cfg.command.program().to_owned(),
            sockets: cfg
                .sockets
                .iter()
                .map(|s| upgrade::SocketState { name: s.name.clone(), fd: s.fd.as_raw_fd(), local: s.local.clone() })
                .collect(),
            policy: Policy { fdstore_max: self.store.max(), ..cfg.policy.clone() },
            store: self
                .store
                .export()
                .into_iter()
                .map(|(name, fd, polled)| upgrade::StoredState { name, fd, polled })
                .collect(),
            store_watching: self.store.is_watching(),
            vault: self.vault.as_ref().map(|v| upgrade::VaultState {
                name: v.name().to_owned(),
                fd: v.sender().as_raw_fd(),
                held: v.held(),
                serial: self.vault_serial,
            }),
            generations,
            next_number: counters.next_number,
            crashes: counters.crashes.iter().map(|c| upgrade::to_mono(*c)).collect(),
            consecutive_failures: counters.consecutive_failures,
            started_mono_us: upgrade::to_mono(self.started),
            restarts: counters.restarts,
            crash_restarts: counters.crash_restarts,
            last_failure: self.last_failure.as_ref().map(|f| f.to_string()),
            flush_retry_mono_us: self.core.flush_retry().map(upgrade::to_mono),
            siblings: cfg.steering.as_ref().map_or_else(Vec::new, |st| {
                st.bound_siblings()
                    .into_iter()
                    .map(|(name, fd)| upgrade::SocketState {
                        name: name.to_owned(),
                        fd: fd.as_raw_fd(),
                        local: crate::listen::describe(fd),
                    })
                    .collect()
            }),
            steering: cfg.steering.as_ref().filter(|st| st.is_steering()).map(|st| st.layout()),
        };
        Ok(Handover {
            format: up.format,
            from_version: env!("CARGO_PKG_VERSION").into(),
            binary: up.binary.clone(),
            previous_binary: self.image.binary.clone(),
            argv: self.image.argv.iter().map(|a| upgrade::os_bytes(a)).collect(),
            upgrades: self.image.upgrades + 1,
            requested_mono_us: upgrade::to_mono(up.requested),
            control: upgrade::PathFd { path: control.path().to_owned(), fd: control.listener_fd() },
            client: up.conn.as_ref().map(|c| c.as_raw_fd()),
            notify: self.notify.export(),
            handoff: self
                .handoff
                .as_ref()
                .map(|(h, _)| upgrade::PathFd { path: h.path().to_owned(), fd: h.listener_fd() }),
            upstream: self.upstream.as_ref().map(|u| u.address().to_owned()),
            supervisor,
        })
    }

    /// Rebuilds the supervisor from the state handed over by the previous
    /// program image (`baton upgrade`), taking over every fd it names.
    /// Returns it with its control requests, ready to [`run`](Self::run)
    /// (which answers the upgrade's client and tells systemd READY=1). Must
    /// run inside a tokio runtime.
    pub fn adopt(h: Handover) -> Result<(Self, mpsc::Receiver<Incoming>), SupervisorError> {
        let bad = |m: String| SupervisorError::Upgrade(UpgradeError::State(m));
        let io = |context| move |source| SupervisorError::Io { context, source };
        let s = h.supervisor;
        // Own every fd first: whatever fails below, they are closed, not
        // leaked.
        let mut fds = upgrade::Adopter::default();
        let control_fd = fds.take(h.control.fd, "the control socket")?;
        let notify_fd = fds.take(h.notify.fd, "the notify socket")?;
        let client = h.client.map(|fd| fds.take(fd, "the upgrade client's connection")).transpose()?;
        let handoff_fd = match &h.handoff {
            Some(x) => Some((x.path.clone(), fds.take(x.fd, "the handoff socket")?)),
            None => None,
        };
        let mut sockets = Vec::with_capacity(s.sockets.len());
        for x in &s.sockets {
            let fd = fds.take(x.fd, &format!("listening socket {}", x.name))?;
            sockets.push(BoundSocket { name: x.name.clone(), fd, local: x.local.clone() });
        }
        let mut siblings = Vec::with_capacity(s.siblings.len());
        for x in &s.siblings {
            let fd = fds.take(x.fd, &format!("the sibling of listening socket {}", x.name))?;
            siblings.push(BoundSocket { name: x.name.clone(), fd, local: x.local.clone() });
        }
        let mut stored = Vec::with_capacity(s.store.len());
        for x in &s.store {
            stored.push((x.name.clone(), fds.take(x.fd, &format!("fd-store entry {}", x.name))?, x.polled));
        }
        let vault = match &s.vault {
            Some(v) => {
                Some(crate::vault::Vault::restore(fds.take(v.fd, "the connection vault")?, v.name.clone(), v.held))
            }
            None => None,
        };
        struct Taken {
            pidfd: OwnedFd,
            main: Option<MainProcess>,
            output: Option<OwnedFd>,
            handoff: Option<OwnedFd>,
            probe: Option<OwnedFd>,
        }
        let mut taken = Vec::with_capacity(s.generations.len());
        for g in &s.generations {
            let what = |x: &str| format!("generation {}'s {x}", g.number);
            taken.push(Taken {
                pidfd: fds.take(g.pidfd, &what("pidfd"))?,
                main: match g.main_pidfd {
                    Some(fd) => Some(MainProcess::adopt(g.main_pid, fds.take(fd, &what("main process pidfd"))?)),
                    // Written by an image that kept no pidfd for it: pin it
                    // now if it still belongs to the generation.
                    None if g.main_pid != g.pid => MainProcess::pin(g.main_pid, g.pid).ok(),
                    None => None,
                },
                output: g.output_fd.map(|fd| fds.take(fd, &what("output pipe"))).transpose()?,
                handoff: g.handoff.map(|fd| fds.take(fd, &what("handoff connection"))).transpose()?,
                probe: g.probe.map(|fd| fds.take(fd, &what("probe listener"))).transpose()?,
            });
        }

        let argv: Vec<OsString> = s.app_argv.iter().map(|a| upgrade::bytes_os(a)).collect();
        let Some((program, args)) = argv.split_first() else {
            return Err(bad("the app's command line is empty".into()));
        };
        // Resolved again from the command line as given, so argv[0] stays
        // what the user wrote; if that now finds another program, the one
        // the generations run is kept.
        let command = match AppCommand::new(program, args) {
            Ok(c) if c.program() == s.app_program => c,
            other => match (AppCommand::new(s.app_program.as_os_str(), args), other) {
                (Ok(c), _) | (Err(_), Ok(c)) => c,
                // Checked by the old image moments ago, so the program just
                // vanished. Failing here would abandon the running
                // generations; instead starting a new one reports why.
                (Err(e), Err(_)) => {
                    tracing::error!("the app's program is gone: {e}; restarts fail until baton is restarted");
                    let message = format!("baton: the app's program vanished during baton's upgrade: {e}");
                    let script = "echo \"$1\" >&2; exit 127";
                    AppCommand::new("/bin/sh".as_ref(), &["-c".into(), script.into(), "sh".into(), message.into()])
                        .map_err(|e| bad(e.to_string()))?
                }
            },
        };

        reaper::become_subreaper().map_err(io("becoming the subreaper of the app's processes"))?;
        let reaper = Reaper::start().map_err(io("starting the child reaper"))?;
        // Not dropped if anything below fails: dropping them would unlink
        // their paths, which the previous image needs back when this one
        // hands control back (see `upgrade::Fallback`).
        let (control, requests) = ControlServer::adopt(&h.control.path, control_fd).map_err(|e| bad(e.to_string()))?;
        let control = ManuallyDrop::new(control);
        let notify =
            ManuallyDrop::new(NotifyServer::adopt(notify_fd, &h.notify).map_err(io("adopting the notify socket"))?);
        let handoff = ManuallyDrop::new(match handoff_fd {
            Some((path, fd)) => {
                Some(crate::handoff::HandoffServer::adopt(&path, fd).map_err(io("adopting the handoff socket"))?)
            }
            None => None,
        });
        let upstream = match h.upstream.as_deref().map(Notifier::new) {
            Some(Ok(n)) => Some(Arc::new(n)),
            Some(Err(e)) => {
                tracing::warn!("cannot notify the service manager any more: {e}");
                None
            }
            None => None,
        };
        let store = FdStore::restore(s.policy.fdstore_max, stored, s.store_watching).map_err(|e| bad(e.to_string()))?;
        let output_closed = Arc::new(tokio::sync::Notify::new());
        let now = Instant::now();
        let mut gens = Vec::with_capacity(s.generations.len());
        let mut procs = Vec::with_capacity(s.generations.len());
        let mut lost = Vec::new();
        for (g, t) in s.generations.into_iter().zip(taken) {
            let state = match g.state.as_str() {
                "active" => State::Active,
                "draining" => {
                    State::Draining { kill_at: g.kill_at_mono_us.map_or(now, upgrade::from_mono), killed: g.killed }
                }
                other => return Err(bad(format!("generation {} is in state {other:?}", g.number))),
            };
            let output = match (g.output, t.output) {
                (OutputKind::Pipe, Some(fd)) => Output::Captured(
                    crate::output::adopt(
                        crate::output::Adopted {
                            read_end: fd,
                            lines: g.output_lines,
                            unwritten: g.output_unwritten,
                            identity: crate::journal::Identity::new(command.program(), g.number),
                            pid: g.pid,
                        },
                        Arc::clone(&output_closed),
                    )
                    .map_err(io("adopting a generation's output pipe"))?,
                ),
                (OutputKind::Pipe, None) => Output::Captured(crate::output::Tail::finished(g.output_lines)),
                (OutputKind::None, None) => Output::Inherited,
                (OutputKind::None, Some(_)) => {
                    return Err(bad(format!("generation {} has no output pipe but names one", g.number)));
                }
            };
            // An exit the previous image reaped but had not processed yet
            // (it takes all it can before the exec; this is the safety
            // net): the pidfd then no longer refers to a child of ours.
            let gone = matches!(
                rustix::process::waitid(
                    rustix::process::WaitId::PidFd(t.pidfd.as_fd()),
                    rustix::process::WaitIdOptions::EXITED
                        | rustix::process::WaitIdOptions::NOHANG
                        | rustix::process::WaitIdOptions::NOWAIT,
                ),
                Err(rustix::io::Errno::CHILD)
            );
            if gone {
                lost.push(g.pid);
            }
            let spawned_at = upgrade::from_mono(g.spawned_mono_us);
            let handoff = t.handoff.map(ReceivedFd::new);
            let probe = t.probe.map(ProbeSocket::adopt).transpose().map_err(io("adopting a probe listener"))?;
            gens.push(Gen {
                number: g.number,
                leader: g.pid,
                life: Life {
                    state,
                    start_deadline: now,
                    watchdog: g.watchdog,
                    last_ping: upgrade::from_mono(g.last_ping_mono_us),
                },
                spawned_at,
                ready_at: g.ready_mono_us.map(upgrade::from_mono),
                status_text: g.status_text,
                handoff: handoff.is_some(),
                slot: if g.slot == 1 { Slot::B } else { Slot::A },
                // Active or draining: proven by the image before.
                proof: self::core::Proof { ready: true, cmd_passed: true, ..Default::default() },
            });
            procs.push(Procs {
                number: g.number,
                child: Child { pid: g.pid, pidfd: t.pidfd },
                main: t.main,
                spawned_at,
                output,
                health: None,
                handoff,
                passed: g.passed,
                probe,
            });
        }
        let counters = Counters {
            next_number: s.next_number,
            restarts: s.restarts,
            crash_restarts: s.crash_restarts,
            consecutive_failures: s.consecutive_failures,
            crashes: s.crashes.into_iter().map(upgrade::from_mono).collect(),
        };
        let core = Core::adopt(s.policy.clone(), counters, gens, s.flush_retry_mono_us.map(upgrade::from_mono));
        let steering = match &s.steering {
            Some(layout) => {
                Some(restore_steering(&sockets, siblings, layout).map_err(io("adopting the steered sockets"))?)
            }
            None => None,
        };
        let cfg = Config {
            name: s.name,
            command,
            command_line: argv,
            sockets,
            stored: Vec::new(),
            inherited_vaults: Vec::new(),
            policy: s.policy,
            steering,
        };
        let image = Image {
            binary: Some(h.binary),
            argv: h.argv.iter().map(|a| upgrade::bytes_os(a)).collect(),
            upgrades: h.upgrades,
            started: now,
            exe: upgrade::open_own_exe().map(Arc::new),
        };
        let supervisor = Supervisor {
            cfg,
            notify: ManuallyDrop::into_inner(notify),
            reaper,
            store,
            upstream,
            vault,
            vault_serial: s.vault.as_ref().map_or(0, |v| v.serial),
            procs,
            core,
            waiters: Waiters::default(),
            fds: FdHandles::default(),
            started: upgrade::from_mono(s.started_mono_us),
            last_failure: s.last_failure.map(Failure::Inherited),
            failed_output: None,
            output_closed,
            inherited_to: InheritedTo::detect(),
            handoff: ManuallyDrop::into_inner(handoff),
            control: Some(ManuallyDrop::into_inner(control)),
            image,
            upgrading: None,
            upgrade_request: None,
            adopted: Some(Adopted {
                client,
                requested_mono_us: h.requested_mono_us,
                from_version: h.from_version,
                lost,
                failed: None,
                previous_binary: h.previous_binary,
            }),
            refusals: RefusalLog::new(),
            probes: tokio::task::JoinSet::new(),
            queue_watch: None,
            relays: tokio::task::JoinSet::new(),
            handoff_watch: None,
        };
        Ok((supervisor, requests))
    }

    /// This image is the previous one, back after the next image could not
    /// adopt its state (`reason`): it answers the `baton upgrade` client
    /// with that, and is again what it was before the upgrade.
    pub fn after_failed_upgrade(mut self, reason: String) -> Self {
        if let Some(adopted) = &mut self.adopted {
            self.image.binary = adopted.previous_binary.take().or(self.image.binary.take());
            self.image.upgrades = self.image.upgrades.saturating_sub(1);
            adopted.failed = Some(reason);
        }
        self
    }

    /// The adopting image is running (signal handlers installed): let
    /// pending signals in, settle lost exits, tell systemd and the client.
    pub(super) fn finish_adoption(&mut self, adopted: Adopted) {
        upgrade::unblock_handled_signals();
        for pid in adopted.lost {
            tracing::warn!(event = "exit-lost", pid, "pid {pid} ended during the upgrade; its exit status is unknown");
            self.on_gone(pid, Exit::LostDuringUpgrade);
        }
        let elapsed_ms = upgrade::mono_now_us().saturating_sub(adopted.requested_mono_us) / 1000;
        let version = env!("CARGO_PKG_VERSION");
        let binary = self.image.binary.as_ref().map(|b| b.display().to_string()).unwrap_or_default();
        let response = match adopted.failed {
            Some(reason) => {
                let message = format!(
                    "{reason}; baton went back to the binary it ran before ({binary}, baton {version}), which keeps \
                     running: the generations were not touched"
                );
                tracing::error!(event = "upgrade-failed", elapsed_ms, "{message}");
                let serving = self.serving_status().unwrap_or_else(|| "no generation serving".into());
                let status = format!("upgrade failed; {serving}");
                self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                Response::Error { message }
            }
            None => self.announce_upgrade(&adopted.from_version, binary, elapsed_ms),
        };
        let Some(conn) = adopted.client else { return };
        let mut line = serde_json::to_vec(&response).unwrap_or_default();
        line.push(b'\n');
        let stream = std::os::unix::net::UnixStream::from(conn);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut stream) = tokio::net::UnixStream::from_std(stream) else { return };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Bounded like every control answer; closing is the end of it.
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&line)).await;
        });
    }

    /// Logs a successful upgrade and tells systemd; the client's answer.
    pub(super) fn announce_upgrade(&self, from_version: &str, binary: String, elapsed_ms: u64) -> Response {
        let version = env!("CARGO_PKG_VERSION");
        tracing::info!(
            event = "upgraded",
            version,
            from_version,
            elapsed_ms,
            generations = self.core.generations().len(),
            "baton upgraded in place from {from_version} to {version} ({binary}) in {elapsed_ms} ms"
        );
        let status = match self.serving_status() {
            Some(serving) => format!("{serving}; baton {version} (upgraded in place)"),
            None => format!("baton {version} (upgraded in place)"),
        };
        self.upstream_notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        Response::Upgraded(UpgradeDone {
            pid: std::process::id(),
            version: version.into(),
            binary,
            upgrades: self.image.upgrades,
            elapsed_ms,
            generations: self.core.generations().len(),
        })
    }
}

/// The steering of the image before, taken over as it was: each sibling
/// right after the listener it pairs with, in the layout it measured.
fn restore_steering(
    sockets: &[BoundSocket],
    siblings: Vec<BoundSocket>,
    layout: &crate::steering::Layout,
) -> std::io::Result<crate::steering::Steering> {
    let mut siblings: Vec<Option<BoundSocket>> = siblings.into_iter().map(Some).collect();
    let mut listeners = Vec::with_capacity(sockets.len() + siblings.len());
    for s in sockets {
        listeners.push(BoundSocket { name: s.name.clone(), fd: s.fd.try_clone()?, local: s.local.clone() });
        if let Some(sib) = siblings.iter_mut().find(|x| x.as_ref().is_some_and(|x| x.name == s.name)) {
            listeners.extend(sib.take());
        }
    }
    let (steering, unsteered) = crate::steering::Steering::restore(&listeners, layout)?;
    for u in unsteered {
        tracing::info!(event = "unsteered", name = %u.name, "{} ({}) is shared by every generation: {}", u.name, u.local, u.why);
    }
    Ok(steering)
}
