//! The generated documentation as a user meets it: every man page renders
//! with `man` without a single groff warning, documents its options, and the
//! completion scripts are valid for their shells and know the subcommands.
//! Also the `baton-docgen` command line (usage and write errors).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh directory under cargo's per-target temp dir.
fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("baton-docgen-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `tool` runs here; a missing tool skips the check outside CI and
/// fails it in CI (`CI=true`), where .ci/run installs it.
fn have(tool: &str, package: &str) -> bool {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "`{tool}` is missing: apt-get install {package} (CI must run this check)"
        );
        let _ = writeln!(std::io::stderr(), "SKIP: `{tool}` not found (apt-get install {package})");
    }
    found
}

fn names(paths: &[PathBuf]) -> BTreeSet<String> {
    paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

#[test]
fn man_pages_render_without_warnings() {
    let dir = out_dir("man");
    let generated = baton_docgen::generate(&dir).unwrap();
    let expected: BTreeSet<String> = [
        "baton",
        "baton-run",
        "baton-restart",
        "baton-status",
        "baton-stop",
        "baton-units",
        "baton-notify",
        "baton-upgrade",
        "baton-httpd",
    ]
    .iter()
    .map(|n| format!("{n}.1"))
    .collect();
    assert_eq!(names(&generated.man_pages), expected);
    for page in &generated.man_pages {
        assert!(page.starts_with(dir.join("man")), "{}", page.display());
    }

    // What each page must document: its own options, from the clap definitions.
    let text = |name: &str| fs::read_to_string(dir.join("man").join(name)).unwrap();
    assert!(text("baton.1").contains("Exit codes"), "after_long_help is in baton.1");
    for sub in ["run", "restart", "status", "stop", "units", "notify"] {
        assert!(text("baton.1").contains(sub), "baton.1 lists `{sub}`");
    }
    assert!(text("baton-run.1").contains("stop\\-timeout"), "{}", text("baton-run.1"));
    assert!(text("baton-units.1").contains("systemd\\-version"));
    assert!(text("baton-httpd.1").contains("drain\\-timeout"));
    // The footer names the program and its version on every page.
    let version = env!("CARGO_PKG_VERSION");
    let th = text("baton-run.1").lines().find(|l| l.starts_with(".TH")).unwrap_or_default().to_owned();
    let fields: Vec<&str> = th.split(' ').collect();
    assert_eq!(fields[..3], [".TH", "baton-run", "1"], "{th}");
    assert!(fields[3].len() == 10 && fields[3].as_bytes()[4] == b'-', "a YYYY-MM-DD date: {th}");
    assert!(th.ends_with(&format!(" \"baton {version}\" Baton")), "{th}");
    assert!(text("baton-httpd.1").contains(&format!("\"baton-httpd {version}\"")));

    if !have("man", "man-db") {
        return;
    }
    for page in &generated.man_pages {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            .env("MAN_DISABLE_SECCOMP", "1")
            .env("LANG", "C.UTF-8")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.is_empty(), "man --warnings -l {}: {stderr}", page.display());
        let rendered = String::from_utf8_lossy(&out.stdout);
        assert!(rendered.contains("NAME") && rendered.contains("SYNOPSIS"), "{}:\n{rendered}", page.display());
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn completions_are_valid_scripts() {
    let dir = out_dir("completions");
    let generated = baton_docgen::generate(&dir).unwrap();
    let rel: BTreeSet<String> = generated
        .completions
        .iter()
        .map(|p| p.strip_prefix(dir.join("completions")).unwrap().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = [
        "bash/baton",
        "bash/baton-httpd",
        "zsh/_baton",
        "zsh/_baton-httpd",
        "fish/baton.fish",
        "fish/baton-httpd.fish",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(rel, expected);
    for shell in ["bash", "zsh", "fish"] {
        let baton = fs::read_to_string(dir.join("completions").join(shell).join(match shell {
            "bash" => "baton",
            "zsh" => "_baton",
            _ => "baton.fish",
        }))
        .unwrap();
        for word in ["run", "restart", "units", "--fdstore-max"] {
            assert!(baton.contains(word), "{shell} completion of baton lacks {word}");
        }
    }

    // Syntax checks with the shells themselves (`-n`: parse only).
    for (shell, package, files) in [
        ("bash", "bash", ["bash/baton", "bash/baton-httpd"]),
        ("zsh", "zsh", ["zsh/_baton", "zsh/_baton-httpd"]),
        ("fish", "fish", ["fish/baton.fish", "fish/baton-httpd.fish"]),
    ] {
        if !have(shell, package) {
            continue;
        }
        for f in files {
            let path = dir.join("completions").join(f);
            let out = Command::new(shell).arg("-n").arg(&path).output().unwrap();
            assert!(out.status.success(), "{shell} -n {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        }
    }

    // Bash completion really completes: load it and ask for `baton re<TAB>`.
    let script = format!(
        "source {}; COMP_WORDS=(baton re); COMP_CWORD=1; COMP_LINE='baton re'; COMP_POINT=8; \
         _baton baton re baton; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        dir.join("completions/bash/baton").display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let words = String::from_utf8_lossy(&out.stdout);
    assert!(words.lines().any(|w| w == "restart"), "bash completion of `baton re`: {words:?} {:?}", out.stderr);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn command_line() {
    let bin = env!("CARGO_BIN_EXE_baton-docgen");
    let out = Command::new(bin).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: baton-docgen OUTDIR"));
    let out = Command::new(bin).args(["a", "b"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an option is not taken for a directory");

    // OUTDIR below a regular file cannot be created: exit 1, naming the path.
    let dir = out_dir("cli");
    let file = dir.join("file");
    fs::write(&file, "").unwrap();
    let out = Command::new(bin).arg(file.join("out")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot create directory") && stderr.contains("file/out/man"), "{stderr}");

    let out = Command::new(bin).arg(dir.join("ok")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("ok/man/baton.1").is_file() && dir.join("ok/completions/zsh/_baton").is_file());
    fs::remove_dir_all(&dir).unwrap();
}
