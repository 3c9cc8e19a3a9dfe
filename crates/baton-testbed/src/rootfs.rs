//! The cached Debian trixie root file system (systemd 257) used as the lower
//! layer of [`Flavor::Trixie`](crate::Flavor::Trixie) testbeds.
//!
//! Built once per machine with debootstrap and then reused. Building is
//! serialized with `flock(2)` on a lock file next to the cache, so parallel
//! tests in one or several processes build it once; it is built into a
//! temporary sibling directory and `rename(2)`d into place, so a directory at
//! the cache path is always complete.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use rustix::fs::{FlockOperation, flock};

use crate::error::{Error, IoContext, Result};
use crate::mounts;

/// Environment variable overriding [`DEFAULT_TRIXIE_CACHE`].
pub const CACHE_ENV: &str = "BATON_TESTBED_CACHE";
/// Where the trixie root is cached unless [`CACHE_ENV`] says otherwise. It is
/// outside the repository on purpose: it is large (~250 MB) and shared by all
/// checkouts on the machine.
pub const DEFAULT_TRIXIE_CACHE: &str = "/var/cache/baton-testbed/trixie";
/// Environment variable overriding the Debian mirror used by debootstrap.
pub const MIRROR_ENV: &str = "BATON_TESTBED_MIRROR";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// What the cache was built from. Stored in the root as [`STAMP_FILE`]; a
/// cache built from another recipe is refused instead of silently used.
const RECIPE: &str = "debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus trixie\n";
const STAMP_FILE: &str = ".baton-testbed-recipe";

/// The path of the cached trixie root: `$BATON_TESTBED_CACHE`, or
/// [`DEFAULT_TRIXIE_CACHE`].
pub fn trixie_cache_path() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TRIXIE_CACHE))
}

/// Returns the cached trixie root, building it first if needed (about a
/// minute, needs network access to the mirror and `debootstrap`).
///
/// Safe to call concurrently from several threads and processes: exactly one
/// of them builds, the others wait for it.
pub fn ensure_trixie_root() -> Result<PathBuf> {
    let root = trixie_cache_path();
    if !root.is_absolute() {
        return Err(Error::InvalidArgument(format!("{CACHE_ENV} must be an absolute path, got {}", root.display())));
    }
    // Fast path without the lock: the rename makes the directory appear complete.
    if check_ready(&root)? {
        return Ok(root);
    }
    let Some(debootstrap) = which("debootstrap") else {
        return Err(Error::Missing {
            what: "debootstrap".into(),
            hint: "install debootstrap (apt-get install debootstrap)".into(),
        });
    };
    let unshare = require_tool("unshare", "util-linux")?;
    let parent =
        root.parent().ok_or_else(|| Error::InvalidArgument(format!("cache path {} has no parent", root.display())))?;
    fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;

    let lock_path = sibling(&root, ".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .context(|| format!("opening {}", lock_path.display()))?;
    // Blocks (in the kernel, no polling) while another builder works.
    flock(&lock, FlockOperation::LockExclusive).context(|| format!("locking {}", lock_path.display()))?;
    if check_ready(&root)? {
        return Ok(root);
    }
    build(&root, parent, &debootstrap, &unshare)?;
    drop(lock);
    Ok(root)
}

/// `Ok(true)` if `root` holds a complete root built from [`RECIPE`].
fn check_ready(root: &Path) -> Result<bool> {
    if !root.exists() {
        return Ok(false);
    }
    let stamp = fs::read_to_string(root.join(STAMP_FILE)).unwrap_or_default();
    if stamp != RECIPE {
        return Err(Error::BadCache {
            path: root.to_owned(),
            reason: format!(
                "it was not built by this version of baton-testbed (recipe {:?}, expected {:?}); \
                 delete it (rm -rf {}) and it will be rebuilt",
                stamp.trim(),
                RECIPE.trim(),
                root.display()
            ),
        });
    }
    if !root.join("lib/systemd/systemd").exists() {
        return Err(Error::BadCache {
            path: root.to_owned(),
            reason: format!("lib/systemd/systemd is missing; delete it (rm -rf {})", root.display()),
        });
    }
    Ok(true)
}

/// Builds the root into `<root>.tmp-<pid>` and renames it into place. The
/// caller holds the lock.
fn build(root: &Path, parent: &Path, debootstrap: &Path, unshare: &Path) -> Result<()> {
    remove_stale_builds(root, parent)?;
    let tmp = sibling(root, &format!(".tmp-{}", std::process::id()));
    let log_path = sibling(root, ".debootstrap.log");
    let log = File::create(&log_path).context(|| format!("creating {}", log_path.display()))?;
    let log_err = log.try_clone().context(|| "duplicating log fd".into())?;
    let mirror = std::env::var(MIRROR_ENV).unwrap_or_else(|_| DEFAULT_MIRROR.into());

    // debootstrap mounts /proc and /sys inside the target while it works. In
    // a private mount namespace those mounts vanish with it, even if it gets
    // killed, so a half-built directory never hides a mount.
    let started = Instant::now();
    let status = Command::new(unshare)
        .args(["--mount", "--propagation", "private", "--"])
        .arg(debootstrap)
        .args(["--variant=minbase", "--include=systemd,systemd-sysv,dbus", "trixie"])
        .arg(&tmp)
        .arg(&mirror)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .context(|| "running unshare/debootstrap".into())?;
    if !status.success() {
        let tail = tail_lines(&fs::read_to_string(&log_path).unwrap_or_default(), 30);
        let _ = remove_build_dir(&tmp);
        return Err(Error::Debootstrap { status: status.to_string(), log: log_path, tail });
    }
    // The downloaded .debs are ~70 MB we never need again.
    if let Ok(entries) = fs::read_dir(tmp.join("var/cache/apt/archives")) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let stamp = tmp.join(STAMP_FILE);
    fs::write(&stamp, RECIPE).context(|| format!("writing {}", stamp.display()))?;
    fs::rename(&tmp, root).context(|| format!("renaming {} to {}", tmp.display(), root.display()))?;
    eprintln!(
        "baton-testbed: built trixie root {} in {:.1?} (debootstrap log: {})",
        root.display(),
        started.elapsed(),
        log_path.display()
    );
    Ok(())
}

/// Deletes `<root>.tmp-*` left by builders that died. Safe because we hold
/// the lock, so nobody is building right now.
fn remove_stale_builds(root: &Path, parent: &Path) -> Result<()> {
    let prefix = sibling(root, ".tmp-");
    let prefix = prefix.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let entries = fs::read_dir(parent).context(|| format!("listing {}", parent.display()))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            remove_build_dir(&entry.path())?;
        }
    }
    Ok(())
}

/// `rm -rf` that refuses to run if anything is mounted below `dir`: deleting
/// through a stray /proc or bind mount would be a disaster.
fn remove_build_dir(dir: &Path) -> Result<()> {
    let mounted = mounts::mounts_under(dir)?;
    if !mounted.is_empty() {
        return Err(Error::BadCache {
            path: dir.to_owned(),
            reason: format!("refusing to delete it: {mounted:?} are mounted below it; unmount them"),
        });
    }
    fs::remove_dir_all(dir).context(|| format!("removing {}", dir.display()))
}

/// `<root><suffix>` as a sibling of `root`.
fn sibling(root: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(root.file_name().unwrap_or_default());
    name.push(suffix);
    root.with_file_name(name)
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Looks `program` up in `$PATH` (plus the sbin directories, which a non-login
/// root shell may lack).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Like [`which`], with an error naming the Debian package to install.
pub(crate) fn require_tool(program: &str, package: &str) -> Result<PathBuf> {
    which(program).ok_or_else(|| Error::Missing {
        what: format!("`{program}`"),
        hint: format!("install {package} (apt-get install {package})"),
    })
}
