//! The socket options rustix does not wrap: `SO_ATTACH_REUSEPORT_CBPF`,
//! `TCP_INFO` and `SO_MEMINFO`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::program::Insn;

/// Attaches `prog` to the reuseport group of `fd` (replacing the group's
/// program, for every member at once: `reuseport_attach_prog()` swaps one
/// RCU pointer). Needs no privilege.
pub fn attach_cbpf(fd: BorrowedFd<'_>, prog: &[Insn]) -> io::Result<()> {
    let mut filter: Vec<libc::sock_filter> =
        prog.iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect();
    let len = u16::try_from(filter.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fprog = libc::sock_fprog { len, filter: filter.as_mut_ptr() };
    // SAFETY: `fprog` points at `filter`, which outlives the call; the
    // kernel copies the program and writes nothing back. The length passed
    // is the size of the `sock_fprog` given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// A TCP listener's accept queue: (connections waiting to be accepted, the
/// backlog it was `listen()`ed with). `tcp_get_info()` in
/// `net/ipv4/tcp.c` reports `sk_ack_backlog` as `tcpi_unacked` and
/// `sk_max_ack_backlog` as `tcpi_sacked` for a socket in `TCP_LISTEN`.
pub fn accept_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: all-zero is a valid `tcp_info` (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at
    // most `len` bytes and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // TCP_LISTEN in include/net/tcp_states.h.
    if info.tcpi_state != 10 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a listening TCP socket"));
    }
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// `SO_MEMINFO` in include/uapi/asm-generic/socket.h (x86, arm, riscv, …;
/// not mips, parisc, sparc or alpha, which Baton does not build for).
const SO_MEMINFO: libc::c_int = 55;

/// Bytes of receive buffer in use (`SK_MEMINFO_RMEM_ALLOC` of
/// `SO_MEMINFO`): grows with every queued datagram, even an empty one.
pub fn rmem_alloc(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SK_MEMINFO_VARS in include/uapi/linux/sock_diag.h (9 since 4.x).
    let mut mem = [0u32; 9];
    let mut len = size_of_val(&mem) as libc::socklen_t;
    // SAFETY: `mem` is writable for `len` bytes; the kernel writes at most
    // that many (and fails with EINVAL if it has more to say: never, as
    // it copies min(len, its size)).
    let rc =
        unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_MEMINFO, mem.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mem[libc::SK_MEMINFO_RMEM_ALLOC as usize])
}

/// Removes the group's program (`SO_DETACH_REUSEPORT_BPF`): back to the
/// kernel's hash.
pub fn detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SO_DETACH_REUSEPORT_BPF, include/uapi/asm-generic/socket.h.
    const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;
    let zero: libc::c_int = 0;
    // SAFETY: the option ignores its value; `zero` is readable for its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            (&raw const zero).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
