//! Which of Baton's listening sockets can be steered, and with which
//! sibling: the pure rule, on what the kernel says about each fd.

use std::net::SocketAddr;

use super::Fallback;

/// What the pairing rule needs to know about one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketFacts {
    /// Its `LISTEN_FDNAMES` name.
    pub name: String,
    /// What kind of socket it is.
    pub kind: Kind,
}

/// The socket kinds the rule tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An IP socket: TCP listener (`stream`) or UDP (`!stream`), bound to
    /// `local`, with `SO_REUSEPORT` or not.
    Ip {
        /// TCP (true) or UDP (false).
        stream: bool,
        /// `getsockname()`.
        local: SocketAddr,
        /// `SO_REUSEPORT` is set.
        reuseport: bool,
    },
    /// A Unix socket of any type.
    Unix,
    /// Anything else (another family, a raw socket).
    Other,
}

/// The rule's verdict for each logical listener, in the order of the first
/// socket of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Sockets `first` and `second` (positions in the input) are one
    /// address's pair: `first` becomes slot A's socket, `second` slot B's.
    Pair {
        /// Position of the first of the two in the input.
        first: usize,
        /// Position of the second.
        second: usize,
    },
    /// Socket `at` has `SO_REUSEPORT` and no partner: Baton may bind one.
    BindSibling {
        /// Its position in the input.
        at: usize,
    },
    /// Socket `at` is shared by every generation, for this reason.
    Shared {
        /// Its position in the input.
        at: usize,
        /// Why it is not steered.
        why: Fallback,
    },
}

/// Pairs the sockets: two IP sockets with `SO_REUSEPORT`, the same type,
/// the same local address and the same name are a pair (the first two such;
/// a third is shared). An unpaired one gets [`Plan::BindSibling`] when
/// `bind_siblings` (Baton bound it, so it can bind its sibling into the same
/// group) and is shared otherwise; Unix and other sockets are always shared.
pub fn pair_up(sockets: &[SocketFacts], bind_siblings: bool) -> Vec<Plan> {
    let mut taken = vec![false; sockets.len()];
    let mut plans = Vec::with_capacity(sockets.len());
    for (i, s) in sockets.iter().enumerate() {
        if taken[i] {
            continue;
        }
        taken[i] = true;
        let plan = match s.kind {
            Kind::Unix => Plan::Shared { at: i, why: Fallback::Unix },
            Kind::Other => Plan::Shared { at: i, why: Fallback::NotIp },
            Kind::Ip { reuseport: false, .. } => Plan::Shared { at: i, why: Fallback::NotReusePort },
            Kind::Ip { .. } => {
                let partner = (i + 1..sockets.len()).find(|&j| !taken[j] && sockets[j] == *s);
                let already_paired = plans.iter().any(|p| match p {
                    Plan::Pair { first, .. } => sockets[*first] == *s,
                    _ => false,
                });
                match partner {
                    Some(j) => {
                        taken[j] = true;
                        Plan::Pair { first: i, second: j }
                    }
                    None if already_paired => Plan::Shared { at: i, why: Fallback::ExtraSocket },
                    None if bind_siblings => Plan::BindSibling { at: i },
                    None => Plan::Shared { at: i, why: Fallback::NoSibling },
                }
            }
        };
        plans.push(plan);
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(name: &str, stream: bool, local: &str, reuseport: bool) -> SocketFacts {
        SocketFacts { name: name.into(), kind: Kind::Ip { stream, local: local.parse().unwrap(), reuseport } }
    }

    fn other(name: &str, kind: Kind) -> SocketFacts {
        SocketFacts { name: name.into(), kind }
    }

    #[test]
    fn two_units_for_one_address_make_a_pair() {
        let socks = [ip("http", true, "127.0.0.1:80", true), ip("http", true, "127.0.0.1:80", true)];
        assert_eq!(pair_up(&socks, false), vec![Plan::Pair { first: 0, second: 1 }]);
        assert_eq!(pair_up(&socks, true), vec![Plan::Pair { first: 0, second: 1 }]);
    }

    #[test]
    fn pairs_interleaved_with_other_sockets_keep_the_first_ones_order() {
        // As systemd passes two units' fds: every fd of app.socket, then app-b.socket's.
        let socks = [
            ip("http", true, "[::]:80", true),
            ip("dns", false, "0.0.0.0:53", true),
            other("ctl", Kind::Unix),
            ip("http", true, "[::]:80", true),
            ip("dns", false, "0.0.0.0:53", true),
        ];
        assert_eq!(
            pair_up(&socks, false),
            vec![
                Plan::Pair { first: 0, second: 3 },
                Plan::Pair { first: 1, second: 4 },
                Plan::Shared { at: 2, why: Fallback::Unix },
            ]
        );
    }

    #[test]
    fn anything_that_differs_is_not_a_pair() {
        let cases = [
            // type
            [ip("a", true, "127.0.0.1:80", true), ip("a", false, "127.0.0.1:80", true)],
            // address
            [ip("a", true, "127.0.0.1:80", true), ip("a", true, "127.0.0.2:80", true)],
            // port
            [ip("a", true, "127.0.0.1:80", true), ip("a", true, "127.0.0.1:81", true)],
            // name
            [ip("a", true, "127.0.0.1:80", true), ip("b", true, "127.0.0.1:80", true)],
        ];
        for socks in cases {
            assert_eq!(
                pair_up(&socks, false),
                vec![
                    Plan::Shared { at: 0, why: Fallback::NoSibling },
                    Plan::Shared { at: 1, why: Fallback::NoSibling }
                ],
                "{socks:?}"
            );
            assert_eq!(pair_up(&socks, true), vec![Plan::BindSibling { at: 0 }, Plan::BindSibling { at: 1 }]);
        }
    }

    #[test]
    fn without_reuseport_unix_or_other_families_sockets_are_shared() {
        let socks = [
            ip("a", true, "127.0.0.1:80", false),
            ip("a", true, "127.0.0.1:80", false),
            other("u", Kind::Unix),
            other("o", Kind::Other),
        ];
        for bind in [false, true] {
            assert_eq!(
                pair_up(&socks, bind),
                vec![
                    Plan::Shared { at: 0, why: Fallback::NotReusePort },
                    Plan::Shared { at: 1, why: Fallback::NotReusePort },
                    Plan::Shared { at: 2, why: Fallback::Unix },
                    Plan::Shared { at: 3, why: Fallback::NotIp },
                ]
            );
        }
    }

    #[test]
    fn a_third_socket_at_a_paired_address_is_shared() {
        let s = ip("a", true, "127.0.0.1:80", true);
        let socks = [s.clone(), s.clone(), s.clone(), s.clone(), s];
        assert_eq!(
            pair_up(&socks, true),
            vec![
                Plan::Pair { first: 0, second: 1 },
                Plan::Pair { first: 2, second: 3 },
                Plan::Shared { at: 4, why: Fallback::ExtraSocket },
            ]
        );
    }

    #[test]
    fn every_socket_appears_in_exactly_one_plan() {
        // All 3^n combinations of three kinds over n = 6 positions.
        let kinds = [ip("a", true, "127.0.0.1:80", true), ip("a", false, "127.0.0.1:80", true), other("u", Kind::Unix)];
        for code in 0..3usize.pow(6) {
            let socks: Vec<SocketFacts> = (0..6).map(|d| kinds[(code / 3usize.pow(d)) % 3].clone()).collect();
            for bind in [false, true] {
                let mut seen = vec![0; socks.len()];
                let plans = pair_up(&socks, bind);
                let mut last_first = None;
                for p in &plans {
                    let first = match *p {
                        Plan::Pair { first, second } => {
                            assert!(first < second);
                            assert_eq!(socks[first], socks[second]);
                            seen[second] += 1;
                            first
                        }
                        Plan::BindSibling { at } | Plan::Shared { at, .. } => at,
                    };
                    seen[first] += 1;
                    assert!(last_first < Some(first), "plans follow the order of their first socket");
                    last_first = Some(first);
                }
                assert!(seen.iter().all(|&n| n == 1), "{socks:?} {plans:?}");
            }
        }
    }
}
