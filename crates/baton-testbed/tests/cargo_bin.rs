//! `cargo_bin` from inside `cargo test` (nested cargo on the same target dir).

use std::process::Command;

use baton_testbed::cargo_bin;

#[test]
fn cargo_bin_builds_from_inside_cargo_test() {
    let bin = cargo_bin("baton-testbed", "baton-testbed-fixture");
    assert!(bin.is_absolute(), "{}", bin.display());
    let out = Command::new(&bin).arg("hi").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "baton-testbed-fixture: hi\n");
    // Same profile/target dir as this test binary: a sibling of deps/.
    let this = std::env::current_exe().unwrap();
    assert_eq!(bin.parent(), this.parent().and_then(|deps| deps.parent()));
    // Built once per process.
    assert_eq!(cargo_bin("baton-testbed", "baton-testbed-fixture"), bin);
}
