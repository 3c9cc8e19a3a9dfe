//! Steering: which generation's socket receives new connections.
//!
//! For each TCP or UDP listener Baton keeps two sockets bound to the same
//! address in one `SO_REUSEPORT` group, one per [`Slot`]. Successive
//! generations take turns on the two slots; a classic-BPF reuseport
//! program attached to the group (`SO_ATTACH_REUSEPORT_CBPF`, handled by
//! `sk_reuseport_attach_filter()` in `net/core/filter.c` from
//! `sk_setsockopt()` in `net/core/sock.c`) returns the index of the slot's
//! socket, and `reuseport_select_sock()` in `net/core/sock_reuseport.c`
//! hands every new connection (every datagram) to that socket. Attaching a
//! new program replaces the group's program in one RCU pointer swap
//! (`reuseport_attach_prog()`), so a flip is atomic for the group: each
//! SYN is steered by the old program or by the new one, none is lost, and
//! a connection already queued stays on the socket that took it. Flips of
//! several listeners happen one group after the other.
//!
//! Classic BPF needs no privilege (unlike eBPF's `SK_REUSEPORT` programs),
//! and a socket that is a member can re-attach it from any process holding
//! it, so Baton running as a `DynamicUser=` flips sockets that root's
//! systemd bound. What Baton cannot do there is bind a new member: the
//! kernel only groups sockets of the same owner (`reuseport_match` on the
//! uid in `sk_reuseport_match()`, `net/ipv4/inet_connection_sock.c`), so a
//! different uid gets `EADDRINUSE`. Hence under systemd the pair comes from
//! two `.socket` units (`ReusePort=yes`, written by `baton units`), and
//! standalone Baton binds the sibling itself ([`crate::listen::bind_sibling`];
//! the first socket must itself be bound with `SocketOptions::reuse_port`).
//!
//! A socket's index is its join order in the group; [`Steering::new`]
//! measures it (see [`calibrate`]) and it stays stable because Baton holds
//! both sockets for its whole life (a member leaving would renumber the
//! group).
//!
//! What cannot be steered is shared by every generation as before (today's
//! shared accept), with a [`Fallback`] saying why: Unix sockets (no
//! reuseport groups), IP sockets without `SO_REUSEPORT`, a single inherited
//! socket at an address.
//!
//! Beware: a handshake that began before a flip (a SYN answered, its ACK
//! still to come) completes on the socket the old program chose, up to the
//! SYN-ACK retries later (`net.ipv4.tcp_synack_retries`); the request
//! sockets are not visible in [`Steering::queued`]. On loopback this is
//! microseconds; on a network it is one round trip, more when packets are
//! lost. When a slot is handed back, what its socket queued is taken with
//! [`Steering::take_queued`]: Baton holds the socket, so the kernel's own
//! migration of a closing listener's queue (`net.ipv4.tcp_migrate_req`,
//! `reuseport_migrate_sock()`) never applies.
//!
//! [`Steering::new`] blocks while it measures (a few milliseconds per pair
//! on loopback; up to twice `probe_wait` for a pair that fails): call it
//! before the supervisor's runtime starts, or on a blocking thread. Every
//! other method is a non-blocking system call or two.

pub mod calibrate;
mod pairing;
pub mod program;
mod sys;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::net::{self, AddressFamily, SocketFlags, SocketType, sockopt};

pub use pairing::{Kind, Plan, SocketFacts, pair_up};

use crate::listen::BoundSocket;

/// One of the two sockets of every steered pair. Generations alternate:
/// the first runs on [`Slot::A`], its replacement on [`Slot::B`], the next
/// on A again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Slot {
    /// The socket listed first (standalone: the one `-l` bound).
    A,
    /// Its sibling.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    fn at(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// Why a listener is not steered (it is shared by every generation).
/// [`Display`](fmt::Display) is the text for `status`, logs and the docs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fallback {
    /// Steering was turned off (`--steering off`).
    Disabled,
    /// A Unix socket: the kernel has no reuseport groups for them.
    Unix,
    /// Neither TCP nor UDP.
    NotIp,
    /// The socket was not bound with `SO_REUSEPORT`.
    NotReusePort,
    /// Inherited with `SO_REUSEPORT`, but no second socket with the same
    /// name, type and address was passed.
    NoSibling,
    /// A third socket at an address that already has its pair.
    ExtraSocket,
    /// Binding the sibling failed.
    Sibling(String),
    /// The sockets' order in their group could not be measured.
    Calibration(String),
    /// After `baton upgrade`: the pair is not in the [`Layout`] passed on.
    NotInLayout,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Disabled => f.write_str("steering is off (--steering off)"),
            Fallback::Unix => f.write_str("a Unix socket: the kernel steers only TCP and UDP (SO_REUSEPORT groups)"),
            Fallback::NotIp => f.write_str("neither a TCP nor a UDP socket"),
            Fallback::NotReusePort => f.write_str(
                "the socket has no SO_REUSEPORT (under systemd: add ReusePort=yes to its .socket unit, or \
                 regenerate the units with `baton units`)",
            ),
            Fallback::NoSibling => f.write_str(
                "only one socket was passed for this address; steering needs two with the same \
                 FileDescriptorName=, address and ReusePort=yes (two .socket units, as `baton units` writes)",
            ),
            Fallback::ExtraSocket => f.write_str("a further socket at an address whose pair is already steered"),
            Fallback::Sibling(e) => write!(f, "cannot bind its sibling socket: {e}"),
            Fallback::Calibration(e) => write!(f, "cannot tell the two sockets apart: {e}"),
            Fallback::NotInLayout => {
                f.write_str("the previous Baton did not steer this pair (not in its steering layout)")
            }
        }
    }
}

/// A listener Baton does not steer, for `status` and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsteered {
    /// Its `LISTEN_FDNAMES` name.
    pub name: String,
    /// What it is ([`crate::listen::describe`]).
    pub local: String,
    /// Why it is shared.
    pub why: Fallback,
}

/// How [`Steering::new`] proceeds.
#[derive(Debug, Clone)]
pub struct SteeringOptions {
    /// Steer at all (`--steering auto`); when false every listener is
    /// shared with [`Fallback::Disabled`].
    pub enabled: bool,
    /// Bind a sibling for an IP socket with `SO_REUSEPORT` that has none
    /// among the listeners: true when Baton bound its sockets itself
    /// (standalone `-l`), false for sockets from systemd (a `DynamicUser=`
    /// could not join root's group anyway).
    pub bind_siblings: bool,
    /// How long one calibration probe may take to arrive.
    pub probe_wait: Duration,
    /// Per listener (in order; missing: false): Baton just bound it as a
    /// steerable TCP listener (`SocketOptions::steerable` without
    /// `reuse_port`), so it founded its group and is index 0; the sibling
    /// Baton binds next is index 1. Such a pair is not calibrated, so the
    /// first generation sees no calibration connections.
    pub founded_group: Vec<bool>,
}

impl Default for SteeringOptions {
    fn default() -> Self {
        SteeringOptions {
            enabled: true,
            bind_siblings: false,
            probe_wait: Duration::from_secs(2),
            founded_group: Vec::new(),
        }
    }
}

/// Where new connections go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// All of them to this slot.
    All(Slot),
    /// `percent`% to `to`, the rest to the other slot.
    Canary {
        /// The slot getting the share.
        to: Slot,
        /// The share, 1..=99.
        percent: u8,
    },
}

/// What [`Steering::restore`] needs to take over a running [`Steering`]
/// without measuring again (which only works while nobody accepts): each
/// pair's group indices and where connections go. Serializable, for
/// `baton upgrade`'s state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// The steered pairs, in listener order.
    pub pairs: Vec<PairLayout>,
    /// Where new connections go.
    pub target: Target,
}

/// One steered pair in a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PairLayout {
    /// Its `LISTEN_FDNAMES` name.
    pub name: String,
    /// Its address ([`crate::listen::describe`]).
    pub local: String,
    /// Group index of slot A's socket, then of slot B's.
    pub index: [u32; 2],
    /// Slot B's socket is a sibling Baton bound itself (standalone), which
    /// every `baton upgrade` carries. Absent in layouts without it: false.
    #[serde(default)]
    pub bound_here: bool,
}

/// One logical listener: what one `LISTEN_FDS` entry of a generation is.
#[derive(Debug)]
enum Entry {
    Pair(Pair),
    Shared { name: String, fd: OwnedFd },
}

#[derive(Debug)]
struct Pair {
    name: String,
    local: String,
    stream: bool,
    /// Slot B's socket was bound by this Baton ([`crate::listen::bind_sibling`]).
    bound_here: bool,
    /// By slot: `socks[Slot::A.at()]` is slot A's socket.
    socks: [OwnedFd; 2],
    /// By slot: the socket's index in the group.
    index: [u32; 2],
}

/// The sockets of every listener, paired where they can be steered.
///
/// Construct it once at start-up, before the first generation exists
/// (calibration connects to the sockets); keep it for Baton's life.
#[derive(Debug)]
pub struct Steering {
    entries: Vec<Entry>,
    target: Mutex<Target>,
}

fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// What the pairing rule needs to know about `fd`, from the kernel.
pub fn facts(name: &str, fd: BorrowedFd<'_>) -> SocketFacts {
    let kind = (|| -> io::Result<Kind> {
        let family = sockopt::socket_domain(fd)?;
        if family == AddressFamily::UNIX {
            return Ok(Kind::Unix);
        }
        let ty = sockopt::socket_type(fd)?;
        if (family != AddressFamily::INET && family != AddressFamily::INET6)
            || (ty != SocketType::STREAM && ty != SocketType::DGRAM)
        {
            return Ok(Kind::Other);
        }
        let local = SocketAddr::try_from(net::getsockname(fd)?).map_err(|_| io::ErrorKind::InvalidData)?;
        Ok(Kind::Ip { stream: ty == SocketType::STREAM, local, reuseport: sockopt::socket_reuseport(fd)? })
    })()
    .unwrap_or(Kind::Other);
    SocketFacts { name: name.to_owned(), kind }
}

impl Steering {
    /// Pairs Baton's listening sockets (in `LISTEN_FDS` order) and steers
    /// every pair to [`Slot::A`].
    ///
    /// The sockets are duplicated; the caller keeps its own. Two sockets
    /// with the same name, type, address and `SO_REUSEPORT` are a pair
    /// (under systemd: one from each of two `.socket` units), the first
    /// becoming slot A's. With `opts.bind_siblings` an unpaired one gets a
    /// sibling bound by Baton. Each pair's order in its group is measured
    /// ([`calibrate`]); a pair that cannot be measured is not steered, and
    /// both of its sockets are shared (each generation gets both, under
    /// the one name: neither may go unserved while it is in the group).
    ///
    /// Returns the listeners that are not steered and why. Fails only if
    /// an fd cannot be duplicated (`EMFILE`).
    pub fn new(listeners: &[BoundSocket], opts: &SteeringOptions) -> io::Result<(Steering, Vec<Unsteered>)> {
        let facts: Vec<SocketFacts> = listeners.iter().map(|l| facts(&l.name, l.fd.as_fd())).collect();
        let plans = if opts.enabled {
            pair_up(&facts, opts.bind_siblings)
        } else {
            (0..listeners.len()).map(|at| Plan::Shared { at, why: Fallback::Disabled }).collect()
        };
        let mut entries = Vec::with_capacity(plans.len());
        let mut unsteered = Vec::new();
        let mut share = |entries: &mut Vec<Entry>, at: usize, why: Fallback| -> io::Result<()> {
            let l = &listeners[at];
            entries.push(Entry::Shared { name: l.name.clone(), fd: dup(l.fd.as_fd())? });
            unsteered.push(Unsteered { name: l.name.clone(), local: l.local.clone(), why });
            Ok(())
        };
        for plan in plans {
            // `second`: the partner's position when both were passed in;
            // `b`: slot B's socket (a dup of it, or the sibling just bound).
            let (first, second, b) = match plan {
                Plan::Shared { at, why } => {
                    share(&mut entries, at, why)?;
                    continue;
                }
                Plan::Pair { first, second } => (first, Some(second), dup(listeners[second].fd.as_fd())?),
                Plan::BindSibling { at } => match crate::listen::bind_sibling(listeners[at].fd.as_fd()) {
                    Ok(fd) => (at, None, fd),
                    Err(e) => {
                        share(&mut entries, at, Fallback::Sibling(e.to_string()))?;
                        continue;
                    }
                },
            };
            // pair_up() pairs IP sockets only.
            let Kind::Ip { stream, local, .. } = facts[first].kind else {
                share(&mut entries, first, Fallback::NotIp)?;
                if let Some(j) = second {
                    share(&mut entries, j, Fallback::NotIp)?;
                }
                continue;
            };
            let a = dup(listeners[first].fd.as_fd())?;
            let founded = second.is_none() && stream && opts.founded_group.get(first).copied().unwrap_or(false);
            let index = match founded {
                // Join order is the index: it founded the group, the
                // sibling bound just now joined second.
                true => Ok([0, 1]),
                false => calibrate::indices([a.as_fd(), b.as_fd()], stream, local, opts.probe_wait),
            };
            let measured = index.and_then(|index| {
                sys::attach_cbpf(a.as_fd(), &program::select(index[0]))
                    .map(|()| index)
                    .map_err(|e| format!("SO_ATTACH_REUSEPORT_CBPF failed: {e}"))
            });
            match measured {
                Ok(index) => entries.push(Entry::Pair(Pair {
                    name: listeners[first].name.clone(),
                    local: listeners[first].local.clone(),
                    stream,
                    bound_here: second.is_none(),
                    socks: [a, b],
                    index,
                })),
                Err(reason) => {
                    // Leave no program behind that would starve one of them.
                    let _ = sys::detach(a.as_fd());
                    share(&mut entries, first, Fallback::Calibration(reason.clone()))?;
                    if let Some(j) = second {
                        share(&mut entries, j, Fallback::Calibration(reason))?;
                    }
                    // A sibling Baton bound is closed here, leaving the group.
                }
            }
        }
        Ok((Steering { entries, target: Mutex::new(Target::All(Slot::A)) }, unsteered))
    }

    /// Takes over the steering of a previous Baton (`baton upgrade`): pairs
    /// `listeners` as [`new`](Self::new) does, without binding siblings
    /// (the previous Baton's [`bound_siblings`](Self::bound_siblings) must
    /// be among `listeners`, each after its first socket), and takes each
    /// pair's indices and the target from `layout` instead of measuring
    /// them. Attaches nothing: the group's program stays as the previous
    /// Baton left it. A pair missing from `layout` is shared
    /// ([`Fallback::NotInLayout`]).
    pub fn restore(listeners: &[BoundSocket], layout: &Layout) -> io::Result<(Steering, Vec<Unsteered>)> {
        let facts: Vec<SocketFacts> = listeners.iter().map(|l| facts(&l.name, l.fd.as_fd())).collect();
        let mut entries = Vec::new();
        let mut unsteered = Vec::new();
        let mut share = |entries: &mut Vec<Entry>, at: usize, why: Fallback| -> io::Result<()> {
            let l = &listeners[at];
            entries.push(Entry::Shared { name: l.name.clone(), fd: dup(l.fd.as_fd())? });
            unsteered.push(Unsteered { name: l.name.clone(), local: l.local.clone(), why });
            Ok(())
        };
        for plan in pair_up(&facts, false) {
            match plan {
                Plan::Shared { at, why } => share(&mut entries, at, why)?,
                Plan::BindSibling { at } => share(&mut entries, at, Fallback::NoSibling)?,
                Plan::Pair { first, second } => {
                    let (a, b) = (&listeners[first], &listeners[second]);
                    let known = layout.pairs.iter().find(|p| p.name == a.name && p.local == a.local);
                    let (Some(known), Kind::Ip { stream, .. }) = (known, facts[first].kind) else {
                        share(&mut entries, first, Fallback::NotInLayout)?;
                        share(&mut entries, second, Fallback::NotInLayout)?;
                        continue;
                    };
                    entries.push(Entry::Pair(Pair {
                        name: a.name.clone(),
                        local: a.local.clone(),
                        stream,
                        // Still Baton's to carry: the next upgrade hands
                        // it over again (found by tests/upgrade.rs: the
                        // second upgrade lost the sibling).
                        bound_here: known.bound_here,
                        socks: [dup(a.fd.as_fd())?, dup(b.fd.as_fd())?],
                        index: known.index,
                    }));
                }
            }
        }
        Ok((Steering { entries, target: Mutex::new(layout.target) }, unsteered))
    }

    /// What [`restore`](Self::restore) needs, for `baton upgrade`'s state.
    pub fn layout(&self) -> Layout {
        Layout {
            pairs: self
                .pairs()
                .map(|p| PairLayout {
                    name: p.name.clone(),
                    local: p.local.clone(),
                    index: p.index,
                    bound_here: p.bound_here,
                })
                .collect(),
            target: self.target(),
        }
    }

    /// The sibling sockets this Baton bound itself (standalone), with their
    /// names: to keep across `baton upgrade` (and a restart of Baton, in the
    /// fd store) along with the listeners, each passed after its listener.
    /// Under systemd there are none: both sockets belong to `.socket` units.
    pub fn bound_siblings(&self) -> Vec<(&str, BorrowedFd<'_>)> {
        self.pairs().filter(|p| p.bound_here).map(|p| (p.name.as_str(), p.socks[Slot::B.at()].as_fd())).collect()
    }

    /// The listeners' names in the order of [`sockets_for`](Self::sockets_for)
    /// (the generation's `LISTEN_FDNAMES`).
    pub fn names(&self) -> Vec<&str> {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::Pair(p) => p.name.as_str(),
                Entry::Shared { name, .. } => name.as_str(),
            })
            .collect()
    }

    /// The fds a generation on `slot` gets, in listener order: its slot's
    /// socket of every pair, and every shared socket.
    pub fn sockets_for(&self, slot: Slot) -> Vec<BorrowedFd<'_>> {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::Pair(p) => p.socks[slot.at()].as_fd(),
                Entry::Shared { fd, .. } => fd.as_fd(),
            })
            .collect()
    }

    /// Whether any listener is steered (else slots make no difference).
    pub fn is_steering(&self) -> bool {
        self.entries.iter().any(|e| matches!(e, Entry::Pair(_)))
    }

    /// The steered listeners, for `status`: (name, local address).
    pub fn steered(&self) -> Vec<(&str, &str)> {
        self.pairs().map(|p| (p.name.as_str(), p.local.as_str())).collect()
    }

    /// Where new connections go now.
    pub fn target(&self) -> Target {
        *self.target.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pairs(&self) -> impl Iterator<Item = &Pair> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Pair(p) => Some(p),
            Entry::Shared { .. } => None,
        })
    }

    fn attach_all(&self, prog: impl Fn(&Pair) -> Vec<program::Insn>, target: Target) -> io::Result<()> {
        let mut result = Ok(());
        for p in self.pairs() {
            if let Err(e) = sys::attach_cbpf(p.socks[0].as_fd(), &prog(p)) {
                // Keep going: the other groups should follow the flip.
                result = Err(io::Error::new(e.kind(), format!("steering {} ({}): {e}", p.name, p.local)));
            }
        }
        if result.is_ok() {
            *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        }
        result
    }

    /// Every new connection (datagram) of every pair to `to`'s socket,
    /// from now on: one program attach per pair, atomic within each.
    pub fn steer(&self, to: Slot) -> io::Result<()> {
        self.attach_all(|p| program::select(p.index[to.at()]), Target::All(to))
    }

    /// `percent`% of new connections (drawn at random for each) to `to`,
    /// the rest to the other slot. 0 is [`steer`](Self::steer) to the
    /// other slot, 100 to `to`; more than 100 is `InvalidInput`.
    pub fn canary(&self, to: Slot, percent: u8) -> io::Result<()> {
        let target = match percent {
            0 => Target::All(to.other()),
            100 => Target::All(to),
            101.. => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("canary {percent}% is over 100%")));
            }
            p => Target::Canary { to, percent: p },
        };
        self.attach_all(
            |p| {
                program::canary(p.index[to.at()], p.index[to.other().at()], percent)
                    .unwrap_or_else(|| program::select(p.index[to.other().at()]))
            },
            target,
        )
    }

    /// Connections waiting in the accept queues of `slot`'s TCP sockets
    /// (`TCP_INFO`), summed; UDP pairs are not counted.
    pub fn queued(&self, slot: Slot) -> io::Result<u32> {
        let mut n = 0u32;
        for p in self.pairs().filter(|p| p.stream) {
            n = n.saturating_add(sys::accept_queue(p.socks[slot.at()].as_fd())?.0);
        }
        Ok(n)
    }

    /// Accepts the connections queued on `slot`'s TCP sockets, at most
    /// `max` in all, each with the position of its listener in
    /// [`names`](Self::names); the connections are `CLOEXEC` and
    /// non-blocking.
    ///
    /// For handing a slot back: when no process accepts on the slot any
    /// more. The socket's `O_NONBLOCK` is shared with every process holding
    /// it, so it is set only for the duration of the call; a process that
    /// still blocks in `accept()` keeps blocking, but one calling
    /// `accept()` meanwhile would see `EAGAIN`.
    pub fn take_queued(&self, slot: Slot, max: usize) -> io::Result<Vec<(usize, OwnedFd)>> {
        let mut taken = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let Entry::Pair(p) = e else { continue };
            if !p.stream || taken.len() >= max {
                continue;
            }
            let fd = p.socks[slot.at()].as_fd();
            let flags = rustix::fs::fcntl_getfl(fd)?;
            let was_blocking = !flags.contains(OFlags::NONBLOCK);
            if was_blocking {
                rustix::fs::fcntl_setfl(fd, flags | OFlags::NONBLOCK)?;
            }
            let mut result = Ok(());
            while taken.len() < max {
                match net::accept_with(fd, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
                    Ok(conn) => taken.push((i, conn)),
                    Err(Errno::AGAIN) => break,
                    // The client gave up before we got to it: next one.
                    Err(Errno::CONNABORTED | Errno::INTR) => {}
                    Err(e) => {
                        result = Err(e.into());
                        break;
                    }
                }
            }
            if was_blocking {
                let restored = rustix::fs::fcntl_setfl(fd, flags);
                result = result.and(restored.map_err(io::Error::from));
            }
            result?;
        }
        Ok(taken)
    }
}

/// A TCP listener's (queued connections, `listen()` backlog), from
/// `TCP_INFO`.
pub fn listen_backlog(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    sys::accept_queue(fd)
}
