//! The cached Debian root file systems used as the lower layer of
//! [`Flavor::Trixie`](crate::Flavor::Trixie) (systemd 257) and
//! [`Flavor::Forky`](crate::Flavor::Forky) (systemd 262) testbeds.
//!
//! Each is built once per machine with debootstrap from its [`Recipe`] and
//! then reused. Building is serialized with `flock(2)` on a lock file next to
//! the cache, so parallel tests in one or several processes build it once; it
//! is built into a temporary sibling directory and `rename(2)`d into place, so
//! a directory at the cache path is always complete. A stamp file in the root
//! records the recipe; a root built from another recipe is refused. A
//! recipe change therefore also changes its default cache path (the trixie
//! root's `-v2`), so checkouts with the older recipe keep their root and
//! each recipe is built once, on first use.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use rustix::fs::{FlockOperation, flock};

use crate::Flavor;
use crate::error::{Error, IoContext, Result};
use crate::mounts;

/// Environment variable overriding [`DEFAULT_TRIXIE_CACHE`].
pub const CACHE_ENV: &str = "BATON_TESTBED_CACHE";
/// Where the trixie root is cached unless [`CACHE_ENV`] says otherwise. It is
/// outside the repository on purpose: it is large (~350 MB) and shared by all
/// checkouts on the machine. `-v2`: the recipe with the real servers'
/// runtimes (python3, nodejs); the first recipe's root stays at `trixie` for
/// the checkouts that still use it.
pub const DEFAULT_TRIXIE_CACHE: &str = "/var/cache/baton-testbed/trixie-v2";
/// Environment variable overriding [`DEFAULT_FORKY_CACHE`].
pub const FORKY_CACHE_ENV: &str = "BATON_TESTBED_FORKY_CACHE";
/// Where the forky root is cached unless [`FORKY_CACHE_ENV`] says otherwise.
pub const DEFAULT_FORKY_CACHE: &str = "/var/cache/baton-testbed/forky";
/// Environment variable overriding the Debian mirror used by debootstrap.
pub const MIRROR_ENV: &str = "BATON_TESTBED_MIRROR";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const STAMP_FILE: &str = ".baton-testbed-recipe";
/// How every cached root is bootstrapped: the smallest Debian variant, plus
/// the recipe's [`Recipe::include`].
const DEBOOTSTRAP_VARIANT: &str = "--variant=minbase";
/// The packages of a root that boots systemd as PID 1 and answers
/// `systemctl` over D-Bus.
const SYSTEMD_PACKAGES: &str = "systemd,systemd-sysv,dbus";
/// [`SYSTEMD_PACKAGES`] and Debian's runtimes of the real servers the proof
/// tests run under systemd 257 (`tests/real_servers*.rs`): python3 for
/// gunicorn (whose pure-Python install the testbed shares from the host)
/// and nodejs for the Node.js `http` server.
const SERVER_PACKAGES: &str = "systemd,systemd-sysv,dbus,python3,nodejs";

/// How one cached root is built and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// The Debian suite given to debootstrap (`trixie`, `forky`).
    pub suite: &'static str,
    /// debootstrap's script argument, when the suite has no script of its
    /// own in the host's debootstrap (bookworm's debootstrap 1.0.128 knows
    /// no `forky`; testing suites all use the `sid` script).
    pub script: Option<&'static str>,
    /// debootstrap's `--include=` list (comma-separated Debian packages).
    pub include: &'static str,
    /// The cache directory unless [`Recipe::cache_env`] is set.
    pub default_cache: &'static str,
    /// Environment variable overriding the cache directory.
    pub cache_env: &'static str,
}

const TRIXIE: Recipe = Recipe {
    suite: "trixie",
    script: None,
    include: SERVER_PACKAGES,
    default_cache: DEFAULT_TRIXIE_CACHE,
    cache_env: CACHE_ENV,
};
const FORKY: Recipe = Recipe {
    suite: "forky",
    script: Some("/usr/share/debootstrap/scripts/sid"),
    include: SYSTEMD_PACKAGES,
    default_cache: DEFAULT_FORKY_CACHE,
    cache_env: FORKY_CACHE_ENV,
};

impl Recipe {
    /// The recipe of `flavor`'s cached root; `None` for [`Flavor::Host`],
    /// which boots on the host's own root.
    pub fn of(flavor: Flavor) -> Option<Recipe> {
        match flavor {
            Flavor::Host => None,
            Flavor::Trixie => Some(TRIXIE),
            Flavor::Forky => Some(FORKY),
        }
    }

    /// The path of the cached root: `$<cache_env>`, or the default.
    pub fn cache_path(&self) -> PathBuf {
        std::env::var_os(self.cache_env)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(self.default_cache))
    }

    /// The stamp written into the root: the debootstrap command line
    /// without the paths that vary between machines.
    fn stamp(&self) -> String {
        let mut stamp = format!("debootstrap {} {}", self.debootstrap_args().join(" "), self.suite);
        if let Some(script) = self.script {
            stamp.push_str(&format!(" DIR MIRROR {script}"));
        }
        stamp.push('\n');
        stamp
    }

    /// debootstrap's options before the suite.
    fn debootstrap_args(&self) -> [String; 2] {
        [DEBOOTSTRAP_VARIANT.to_owned(), format!("--include={}", self.include)]
    }

    /// Returns the cached root, building it first if needed (about a
    /// minute, needs network access to the mirror and `debootstrap`).
    ///
    /// Safe to call concurrently from several threads and processes:
    /// exactly one of them builds, the others wait for it.
    pub fn ensure(&self) -> Result<PathBuf> {
        let root = self.cache_path();
        if !root.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "{} must be an absolute path, got {}",
                self.cache_env,
                root.display()
            )));
        }
        // Fast path without the lock: the rename makes the directory appear complete.
        if self.check_ready(&root)? {
            return Ok(root);
        }
        let Some(debootstrap) = which("debootstrap") else {
            return Err(Error::Missing {
                what: "debootstrap".into(),
                hint: "install debootstrap (apt-get install debootstrap)".into(),
            });
        };
        if let Some(script) = self.script.filter(|s| !Path::new(s).is_file()) {
            return Err(Error::Missing {
                what: format!("debootstrap script {script}"),
                hint: "install debootstrap (apt-get install debootstrap)".into(),
            });
        }
        let unshare = require_tool("unshare", "util-linux")?;
        let parent = root
            .parent()
            .ok_or_else(|| Error::InvalidArgument(format!("cache path {} has no parent", root.display())))?;
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
        if self.check_ready(&root)? {
            return Ok(root);
        }
        self.build(&root, parent, &debootstrap, &unshare)?;
        drop(lock);
        Ok(root)
    }

    /// `Ok(true)` if `root` holds a complete root built from this recipe.
    fn check_ready(&self, root: &Path) -> Result<bool> {
        if !root.exists() {
            return Ok(false);
        }
        let stamp = fs::read_to_string(root.join(STAMP_FILE)).unwrap_or_default();
        let expected = self.stamp();
        if stamp != expected {
            return Err(Error::BadCache {
                path: root.to_owned(),
                reason: format!(
                    "it was not built by this version of baton-testbed (recipe {:?}, expected {:?}); \
                     delete it (rm -rf {}) and it will be rebuilt",
                    stamp.trim(),
                    expected.trim(),
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

    /// Builds the root into `<root>.tmp-<pid>` and renames it into place.
    /// The caller holds the lock.
    fn build(&self, root: &Path, parent: &Path, debootstrap: &Path, unshare: &Path) -> Result<()> {
        remove_stale_builds(root, parent)?;
        let tmp = sibling(root, &format!(".tmp-{}", std::process::id()));
        let log_path = sibling(root, ".debootstrap.log");
        let log = File::create(&log_path).context(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().context(|| "duplicating log fd".into())?;
        let mirror = std::env::var(MIRROR_ENV).unwrap_or_else(|_| DEFAULT_MIRROR.into());

        // debootstrap mounts /proc and /sys inside the target while it works.
        // In a private mount namespace those mounts vanish with it, even if it
        // gets killed, so a half-built directory never hides a mount.
        let started = Instant::now();
        let status = Command::new(unshare)
            .args(["--mount", "--propagation", "private", "--"])
            .arg(debootstrap)
            .args(self.debootstrap_args())
            .arg(self.suite)
            .arg(&tmp)
            .arg(&mirror)
            .args(self.script)
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
        fs::write(&stamp, self.stamp()).context(|| format!("writing {}", stamp.display()))?;
        fs::rename(&tmp, root).context(|| format!("renaming {} to {}", tmp.display(), root.display()))?;
        eprintln!(
            "baton-testbed: built {} root {} in {:.1?} (debootstrap log: {})",
            self.suite,
            root.display(),
            started.elapsed(),
            log_path.display()
        );
        Ok(())
    }
}

/// The path of the cached trixie root: `$BATON_TESTBED_CACHE`, or
/// [`DEFAULT_TRIXIE_CACHE`].
pub fn trixie_cache_path() -> PathBuf {
    TRIXIE.cache_path()
}

/// Returns the cached trixie root, building it first if needed; see
/// [`Recipe::ensure`].
pub fn ensure_trixie_root() -> Result<PathBuf> {
    TRIXIE.ensure()
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
