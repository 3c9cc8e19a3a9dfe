//! The classic-BPF reuseport programs Baton attaches, as plain data.
//!
//! A reuseport program's return value is the index of the socket that gets
//! the packet, in the group's join order (`run_bpf_filter()` in
//! `net/core/sock_reuseport.c`: `index >= socks` means "no choice", and the
//! kernel falls back to its hash). The packet data the program sees starts
//! after the TCP/UDP header; the programs here read none of it, only the
//! ancillary `SKF_AD_RANDOM` word (`bpf_user_rnd_u32()`, see
//! `net/core/filter.c`), so they cost a handful of instructions per new
//! connection or datagram.
//!
//! [`run`] interprets exactly the subset the builders emit, so that the unit
//! tests check what the programs return rather than how they are spelt.

/// One `struct sock_filter` (`include/uapi/linux/filter.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// `BPF_CLASS | BPF_SIZE | BPF_MODE | BPF_OP | BPF_SRC` bits.
    pub code: u16,
    /// Jump offset when the condition holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// The constant operand.
    pub k: u32,
}

// include/uapi/linux/bpf_common.h
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;

/// `SKF_AD_OFF + SKF_AD_RANDOM`: loading this "offset" yields a fresh
/// random 32-bit word (`include/uapi/linux/filter.h`).
const AD_RANDOM: u32 = (-0x1000i32 + 56) as u32;

/// Every new connection (datagram) of the group to the socket at `index`.
pub fn select(index: u32) -> Vec<Insn> {
    vec![Insn { code: BPF_RET | BPF_K, jt: 0, jf: 0, k: index }]
}

/// The random word below which a packet goes to the canary: `percent`% of
/// the 2^32 values, rounded to the nearest (1..=99 only).
fn threshold(percent: u8) -> u32 {
    let t = (u64::from(percent) << 32).div_ceil(100);
    u32::try_from(t).unwrap_or(u32::MAX)
}

/// `percent`% of new connections (at random, each one drawn independently)
/// to the socket at index `to`, the rest to `rest`. 0 and 100 give the
/// one-instruction [`select`] programs; `None` for more than 100.
pub fn canary(to: u32, rest: u32, percent: u8) -> Option<Vec<Insn>> {
    match percent {
        0 => Some(select(rest)),
        100 => Some(select(to)),
        101.. => None,
        p => Some(vec![
            // A = random u32
            Insn { code: BPF_LD | BPF_W | BPF_ABS, jt: 0, jf: 0, k: AD_RANDOM },
            // A >= threshold: skip to the last instruction
            Insn { code: BPF_JMP | BPF_JGE | BPF_K, jt: 1, jf: 0, k: threshold(p) },
            Insn { code: BPF_RET | BPF_K, jt: 0, jf: 0, k: to },
            Insn { code: BPF_RET | BPF_K, jt: 0, jf: 0, k: rest },
        ]),
    }
}

/// Runs `prog` as the kernel would, with `random` as the value of every
/// `SKF_AD_RANDOM` load; `None` if it uses anything else or runs off its
/// end (which the kernel's checker would refuse).
pub fn run(prog: &[Insn], random: u32) -> Option<u32> {
    let mut a = 0u32;
    let mut pc = 0usize;
    loop {
        let insn = prog.get(pc)?;
        match insn.code {
            c if c == BPF_RET | BPF_K => return Some(insn.k),
            c if c == BPF_LD | BPF_W | BPF_ABS && insn.k == AD_RANDOM => a = random,
            c if c == BPF_JMP | BPF_JGE | BPF_K => {
                pc += usize::from(if a >= insn.k { insn.jt } else { insn.jf });
            }
            _ => return None,
        }
        pc += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_returns_its_index_whatever_the_packet() {
        for index in [0, 1, 7, u32::MAX] {
            for random in [0, 1, u32::MAX / 2, u32::MAX] {
                assert_eq!(run(&select(index), random), Some(index));
            }
        }
        assert_eq!(select(1).len(), 1);
    }

    #[test]
    fn canary_extremes_are_plain_selects() {
        assert_eq!(canary(1, 0, 0), Some(select(0)));
        assert_eq!(canary(1, 0, 100), Some(select(1)));
        assert_eq!(canary(1, 0, 101), None);
        assert_eq!(canary(1, 0, 255), None);
    }

    /// The share of the random words that go to `to` is `percent`% within
    /// one part in 2^32, for every percent: counted exactly at the
    /// threshold, not sampled.
    #[test]
    fn canary_share_is_the_percent() {
        for p in 1..100u8 {
            let prog = canary(1, 0, p).unwrap();
            let t = threshold(p);
            assert_eq!(run(&prog, 0), Some(1), "{p}%: the smallest word goes to the canary");
            assert_eq!(run(&prog, t - 1), Some(1), "{p}%");
            assert_eq!(run(&prog, t), Some(0), "{p}%");
            assert_eq!(run(&prog, u32::MAX), Some(0), "{p}%: the largest word stays");
            // t values out of 2^32 go to the canary.
            let share = f64::from(t) / 4_294_967_296.0;
            assert!((share - f64::from(p) / 100.0).abs() < 1e-9, "{p}%: share {share}");
        }
    }

    #[test]
    fn canary_uses_the_indices_given() {
        let prog = canary(0, 1, 50).unwrap();
        assert_eq!(run(&prog, 0), Some(0));
        assert_eq!(run(&prog, u32::MAX), Some(1));
    }

    #[test]
    fn the_interpreter_refuses_what_it_does_not_know() {
        assert_eq!(run(&[], 0), None);
        assert_eq!(run(&[Insn { code: BPF_LD | BPF_W | BPF_ABS, jt: 0, jf: 0, k: 0 }], 0), None);
        assert_eq!(run(&[Insn { code: BPF_LD | BPF_W | BPF_ABS, jt: 0, jf: 0, k: AD_RANDOM }], 0), None);
    }
}
