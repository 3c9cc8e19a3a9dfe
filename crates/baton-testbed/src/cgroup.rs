//! The testbed's private cgroup subtree on the host's cgroup2 hierarchy.
//!
//! Layout, `<mount>` being wherever cgroup2 is mounted on the host
//! (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a hybrid
//! one):
//!
//! ```text
//! <mount>/baton-testbed-<id>/          removed on teardown
//!                          payload/    root of the cgroup namespace = systemd's "/"
//!                          helper/     the `unshare` process, parked outside payload
//! ```
//!
//! `unshare` must be in `payload` when it creates the cgroup namespace (that
//! is what makes `payload` the namespace's root). It is moved to `helper`
//! right after, because cgroup2's "no internal processes" rule would
//! otherwise stop systemd from enabling controllers for its children.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// Finds where cgroup2 is mounted in our mount namespace.
pub(crate) fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context(|| "reading /proc/self/mountinfo".into())?;
    let mounts: Vec<PathBuf> =
        crate::mounts::parse(&mountinfo).into_iter().filter(|m| m.fstype == "cgroup2").map(|m| m.mount_point).collect();
    // Prefer the canonical places; any cgroup2 mount of the same hierarchy works.
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(m) = mounts.iter().find(|m| m.as_path() == Path::new(preferred)) {
            return Ok(m.clone());
        }
    }
    mounts.into_iter().next().ok_or_else(|| Error::Missing {
        what: "a cgroup2 hierarchy".into(),
        hint: "mount one (mount -t cgroup2 none /sys/fs/cgroup) or boot with cgroup v2/hybrid".into(),
    })
}

/// The testbed's cgroup directory and its two children.
#[derive(Debug)]
pub(crate) struct CgroupTree {
    pub(crate) dir: PathBuf,
}

impl CgroupTree {
    /// Creates `<cgroup2 mount>/baton-testbed-<id>/{payload,helper}`.
    pub(crate) fn create(id: &str) -> Result<CgroupTree> {
        let dir = cgroup2_mount()?.join(format!("baton-testbed-{id}"));
        fs::create_dir(&dir).context(|| format!("creating cgroup {}", dir.display()))?;
        let tree = CgroupTree { dir };
        delegate_controllers(&tree.dir);
        for child in [tree.payload(), tree.helper()] {
            fs::create_dir(&child).context(|| format!("creating cgroup {}", child.display()))?;
        }
        Ok(tree)
    }

    pub(crate) fn payload(&self) -> PathBuf {
        self.dir.join("payload")
    }

    pub(crate) fn helper(&self) -> PathBuf {
        self.dir.join("helper")
    }

    /// Moves a process into `helper`.
    pub(crate) fn park_helper(&self, pid: u32) -> Result<()> {
        let procs = self.helper().join("cgroup.procs");
        fs::write(&procs, pid.to_string()).context(|| format!("writing {pid} to {}", procs.display()))
    }
}

/// Enables for our children every controller we have, so systemd inside can
/// use them as on a real machine (memory limits, pids, ...). Best effort, one
/// controller at a time: on a hybrid host cgroup2 has no controllers at all,
/// and systemd copes with missing ones.
fn delegate_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for controller in available.split_whitespace() {
        let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
    }
}

/// Removes a cgroup directory and everything systemd created below it.
///
/// Only empty cgroups can be removed, and a cgroup stays "populated" for a
/// moment after its last process was reaped, so `EBUSY` is retried until
/// `timeout`. A missing directory counts as success.
pub(crate) fn remove_tree(dir: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match remove_bottom_up(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) && Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context(|| format!("removing cgroup {}", dir.display())),
        }
    }
}

fn remove_bottom_up(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        // Child cgroups are the only directories in a cgroup directory.
        if entry.file_type()?.is_dir() {
            remove_bottom_up(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
