//! Building workspace binaries from inside `cargo test`.
//!
//! `CARGO_BIN_EXE_<name>` only exists for binaries of the package under test,
//! but the protocol tests need binaries of *other* workspace packages (e.g.
//! `sd-probe`). [`cargo_bin`] runs a nested `cargo build` for them.
//!
//! Nested cargo and locking: `cargo test` holds the build-directory lock
//! (`<target>/<profile>/.cargo-lock`) only while it compiles and releases it
//! before it runs the test binaries, so a nested `cargo build` on the same
//! target dir does not deadlock (verified with cargo 1.95: see the
//! `cargo_bin_builds_from_inside_cargo_test` test). Builds are serialized
//! within the process and done once per `(package, bin)`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};

/// Where the running executable was built: the pieces needed to build more
/// into the same place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BuildLayout {
    /// The cargo target directory (contains `CACHEDIR.TAG`).
    pub(crate) target_dir: PathBuf,
    /// `Some(triple)` when built with `--target`.
    pub(crate) triple: Option<String>,
    /// The profile's output directory name (`debug`, `release`, custom).
    pub(crate) profile_dir: String,
}

impl BuildLayout {
    /// Derives the layout from the path of the running test executable,
    /// `<target>[/<triple>]/<profile>/deps/<name>-<hash>`.
    pub(crate) fn of_current_exe() -> Result<BuildLayout> {
        let exe = std::env::current_exe().context(|| "locating the current executable".into())?;
        Self::from_exe(&exe).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} is not inside a cargo target directory (no CACHEDIR.TAG above it)",
                exe.display()
            ))
        })
    }

    fn from_exe(exe: &Path) -> Option<BuildLayout> {
        let mut profile = exe.parent()?;
        if matches!(profile.file_name()?.to_str()?, "deps" | "examples") {
            profile = profile.parent()?;
        }
        // Cargo marks the target directory's root with CACHEDIR.TAG.
        let target_dir = profile.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file())?;
        let between = profile.parent()?;
        let triple = (between != target_dir).then(|| between.file_name()?.to_str().map(str::to_owned)).flatten();
        Some(BuildLayout {
            target_dir: target_dir.to_owned(),
            triple,
            profile_dir: profile.file_name()?.to_str()?.to_owned(),
        })
    }

    /// The `--profile` that puts its output into `profile_dir`.
    fn profile_name(&self) -> &str {
        match self.profile_dir.as_str() {
            "debug" => "dev",
            other => other,
        }
    }

    /// The cargo target directory the running executable was built in.
    pub(crate) fn target_dir(&self) -> &Path {
        &self.target_dir
    }
}

/// Builds `bin` of workspace package `package` (once per process) with the
/// same profile, target triple and target directory as the running test, and
/// returns the absolute path of the executable.
///
/// Uses `$CARGO` (set by cargo for the tests it runs), falling back to
/// `cargo` on `$PATH`.
///
/// # Panics
/// If the build fails, with cargo's output: this is a test helper. Use
/// [`try_cargo_bin`] to handle the error yourself.
pub fn cargo_bin(package: &str, bin: &str) -> PathBuf {
    try_cargo_bin(package, bin).unwrap_or_else(|e| panic!("cargo_bin({package}, {bin}): {e}"))
}

/// Like [`cargo_bin`], but returns errors instead of panicking.
pub fn try_cargo_bin(package: &str, bin: &str) -> Result<PathBuf> {
    static BUILT: Mutex<Option<HashMap<(String, String), PathBuf>>> = Mutex::new(None);
    // Held across the build: concurrent callers wait for one build instead of
    // racing cargo against itself.
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    let key = (package.to_owned(), bin.to_owned());
    if let Some(path) = built.get(&key) {
        return Ok(path.clone());
    }

    let layout = BuildLayout::of_current_exe()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin, "--profile"])
        .arg(layout.profile_name())
        .arg("--target-dir")
        .arg(&layout.target_dir);
    if let Some(triple) = &layout.triple {
        cmd.args(["--target", triple]);
    }
    // Tests may change their working directory; the manifest dir (set by
    // cargo for the test run) is always inside the workspace.
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        cmd.current_dir(dir);
    }
    let command = crate::cmd::describe(&cmd).join(" ");
    let output = cmd.output().context(|| format!("running `{command}`"))?;
    if !output.status.success() {
        return Err(Error::CargoBuild {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }

    let mut path = layout.target_dir.clone();
    if let Some(triple) = &layout.triple {
        path.push(triple);
    }
    path.push(&layout.profile_dir);
    path.push(bin);
    if !path.is_file() {
        return Err(Error::InvalidArgument(format!("`{command}` succeeded but {} does not exist", path.display())));
    }
    built.insert(key, path.clone());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn layout_from_exe_paths() {
        let tmp = std::env::temp_dir().join(format!("baton-testbed-layout-{}", std::process::id()));
        let deps = tmp.join("target/x86_64-unknown-linux-gnu/release/deps");
        fs::create_dir_all(&deps).unwrap();
        fs::create_dir_all(tmp.join("target/debug/deps")).unwrap();
        fs::write(tmp.join("target/CACHEDIR.TAG"), "").unwrap();

        let l = BuildLayout::from_exe(&tmp.join("target/debug/deps/t-123")).unwrap();
        assert_eq!(l.target_dir, tmp.join("target"));
        assert_eq!(l.triple, None);
        assert_eq!(l.profile_dir, "debug");
        assert_eq!(l.profile_name(), "dev");

        let l = BuildLayout::from_exe(&deps.join("t-123")).unwrap();
        assert_eq!(l.triple.as_deref(), Some("x86_64-unknown-linux-gnu"));
        assert_eq!(l.profile_name(), "release");

        fs::remove_dir_all(&tmp).unwrap();
    }
}
