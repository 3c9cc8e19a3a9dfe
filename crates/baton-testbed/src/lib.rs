//! Test support for Baton: boots a **real systemd** as PID 1 of fresh private
//! namespaces so integration tests can check protocol behaviour (socket
//! activation, `sd_notify`, the fd store, restarts) against the systemd
//! versions we support.
//!
//! - [`Flavor::Host`]: the host's own systemd (252 on Debian 12), on an
//!   overlay of the host root.
//! - [`Flavor::Trixie`]: systemd 257 from a Debian trixie root built once with
//!   debootstrap and cached (see [`Recipe`]).
//! - [`Flavor::Forky`]: systemd 262 from a Debian forky (testing) root,
//!   built and cached the same way.
//!
//! ```no_run
//! use baton_testbed::{skip_unless_root, Flavor, Testbed};
//!
//! # fn main() -> Result<(), baton_testbed::Error> {
//! if !skip_unless_root("example") {
//!     return Ok(());
//! }
//! let tb = Testbed::boot(Flavor::Host)?;
//! tb.install_unit("demo.service", "[Service]\nExecStart=/bin/sleep infinity\n")?;
//! tb.systemctl_checked(&["start", "demo.service"])?;
//! assert_eq!(tb.show("demo.service", "ActiveState")?, "active");
//! # Ok(())
//! # }
//! ```
//!
//! # What is shared with the host
//!
//! - the **network namespace**: services listen on the host's 127.0.0.1 (use
//!   [`free_loopback_port`] for unique ports);
//! - [`Testbed::scratch`] and the cargo target directory, bind-mounted at the
//!   same absolute paths (more with [`TestbedBuilder::bind`]);
//! - nothing else is writable: all other changes land in a tmpfs upper layer
//!   that disappears with the testbed. The host's /tmp, /dev, /run and
//!   journal are never touched. systemd boots `baton-testbed.target`
//!   (sysinit + sockets) so none of the host's enabled services start.
//!
//! # Requirements
//!
//! Root, Linux with cgroup2 (unified or hybrid), `util-linux` (`unshare`,
//! `nsenter`), `systemd` on the host; `debootstrap` and access to a Debian
//! mirror the first time a [`Flavor::Trixie`] or [`Flavor::Forky`] testbed is
//! booted.
//!
//! # Environment
//!
//! - `BATON_TESTBED_CACHE`: path of the cached trixie root (default
//!   [`DEFAULT_TRIXIE_CACHE`]).
//! - `BATON_TESTBED_FORKY_CACHE`: path of the cached forky root (default
//!   [`DEFAULT_FORKY_CACHE`]).
//! - `BATON_TESTBED_MIRROR`: Debian mirror for debootstrap (default
//!   `http://deb.debian.org/debian`).
//! - `BATON_TESTBED_STATE_DIR`: where per-testbed state directories go
//!   (default [`DEFAULT_STATE_BASE`]).
//! - `CI`: when `true`, [`skip_unless_root`] panics instead of skipping.
//!
//! # In integration tests
//!
//! [`Bed`] wraps a [`Testbed`] with the operations the tests under systemd
//! share (panicking with the test's name), and [`systemd_tests!`] makes a
//! test once per flavor.
//!
//! # Without systemd
//!
//! [`baton`] starts `baton run` itself, as a child of the test (no root
//! needed); [`probe`] holds the clients of the conformance probe's answer.

pub mod baton;
mod bed;
mod boot;
mod cargo;
mod cgroup;
mod cmd;
mod error;
pub mod httpd;
pub mod load;
pub mod mounts;
pub mod probe;
mod rootfs;
mod support;
mod testbed;

use std::fmt;

pub use bed::{Bed, BedBuilder, DEFAULT_WAIT};
pub use boot::{DEFAULT_BOOT_TIMEOUT, DEFAULT_COMMAND_TIMEOUT, DEFAULT_STATE_BASE, STATE_DIR_ENV, TestbedBuilder};
pub use cargo::{cargo_bin, try_cargo_bin};
pub use cmd::CmdOutput;
pub use error::{Error, Result};
pub use rootfs::{
    CACHE_ENV, DEFAULT_FORKY_CACHE, DEFAULT_TRIXIE_CACHE, FORKY_CACHE_ENV, MIRROR_ENV, Recipe, ensure_trixie_root,
    trixie_cache_path,
};
pub use support::{expect_success, free_loopback_port, poll_until, skip_unless_root, terminate, unique_temp_dir};
pub use testbed::Testbed;

/// Which systemd a [`Testbed`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// The host's systemd (252 on Debian 12), lower layer `/`.
    Host,
    /// systemd 257 from a cached Debian trixie root (lower layer
    /// [`trixie_cache_path`]), built with debootstrap on first use.
    Trixie,
    /// systemd 262 from a cached Debian forky (testing) root (lower layer
    /// [`Recipe::cache_path`]), built with debootstrap on first use.
    Forky,
}

impl Flavor {
    /// All flavors, oldest systemd first.
    pub const ALL: [Flavor; 3] = [Flavor::Host, Flavor::Trixie, Flavor::Forky];

    /// The systemd major version this flavor is expected to run (252, 257,
    /// 262). [`Testbed::systemd_version`] reports what actually booted.
    pub fn expected_systemd(self) -> u32 {
        match self {
            Flavor::Host => 252,
            Flavor::Trixie => 257,
            Flavor::Forky => 262,
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Host => "host",
            Flavor::Trixie => "trixie",
            Flavor::Forky => "forky",
        })
    }
}
