//! Checks of `baton units`' options that clap cannot make: names systemd
//! and the kernel accept (`UNIT_NAME_MAX`, `sun_path`), users, addresses a
//! `.socket` unit can hold, and proving options `baton run` accepts.

use super::*;

/// The proving options: supervised only, and a combination `baton run`
/// accepts. Checked by `baton run`'s own parser and [`RunArgs::check`]
/// on the words `ExecStart=` will carry, so that a unit never holds a
/// command line its Baton would refuse at every start.
///
/// [`RunArgs::check`]: crate::cli::RunArgs::check
pub(super) fn check_proving(args: &UnitsArgs) -> Result<(), UnitsError> {
    let fail = |reason: String| Err(UnitsError::Proving { reason });
    if args.topology() == Topology::Direct {
        if let Some(option) = args.first_proving_option() {
            return fail(format!(
                "{option} is an option of Baton's supervisor, and in the direct topology systemd runs the app \
                 itself; use the supervised topology, or leave {option} out"
            ));
        }
        return Ok(());
    }
    let words = args.proving_words();
    if words.is_empty() {
        return Ok(());
    }
    let argv = ["baton", "run"].into_iter().map(str::to_owned).chain(words).chain(["--".into(), "/bin/true".into()]);
    let parsed = <crate::cli::Cli as clap::Parser>::try_parse_from(argv);
    match parsed.map(|cli| cli.command) {
        Ok(crate::cli::Command::Run(run)) => run.check().or_else(fail),
        Ok(_) => fail("`baton run` did not parse as itself".into()),
        Err(e) => fail(format!("`baton run` would refuse them: {}", e.kind())),
    }
}

pub(super) fn check_name(name: &str) -> Result<(), UnitsError> {
    let fail = |reason: &str| Err(UnitsError::Name { name: name.to_owned(), reason: reason.to_owned() });
    if name.is_empty() {
        return fail("it is empty");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return fail("use only ASCII letters, digits, '.', '_' and '-' (it names units, a directory and sockets)");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return fail("it must start with a letter or a digit");
    }
    if name.ends_with(".service") || name.ends_with(".socket") {
        return fail("give the name without a unit suffix (web, not web.service)");
    }
    // Baton's notify socket, /run/NAME/NAME.notify, is the longest path.
    let longest = runtime_dir(name).len() + 1 + name.len() + ".notify".len();
    if longest > UNIX_PATH_MAX {
        return fail(&format!(
            "it is too long: Baton's socket {}/{name}.notify would exceed the {UNIX_PATH_MAX}-byte limit of socket paths",
            runtime_dir(name)
        ));
    }
    Ok(())
}

/// `RuntimeDirectory=NAME` of a system service.
pub(super) fn runtime_dir(name: &str) -> String {
    format!("/run/{name}")
}

/// systemd's rules for `User=` (relaxed: dots allowed), or a numeric uid
/// other than the invalid 4294967295 and the overflow uid 65535.
pub(super) fn valid_user(user: &str) -> bool {
    if !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()) {
        return user.parse::<u32>().is_ok_and(|uid| uid != u32::MAX && uid != 65535);
    }
    let mut bytes = user.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && user.len() <= 31
}

/// Refuses addresses a `.socket` unit cannot hold or that would break.
pub(super) fn check_addr(args: &UnitsArgs, spec: &ListenSpec) -> Result<(), String> {
    match &spec.addr {
        ListenAddr::Tcp(a) | ListenAddr::Udp(a) if a.port() == 0 => {
            Err("port 0 would be a different random port at every start of the socket; give a fixed port".into())
        }
        ListenAddr::Tcp(_) | ListenAddr::Udp(_) => Ok(()),
        ListenAddr::Unix { path, .. } => {
            let text = path.to_str().ok_or("the path is not UTF-8, which a unit file cannot hold")?;
            check_unit_value("path", text)?;
            let dir = runtime_dir(&args.name);
            if path.starts_with(&dir) {
                return Err(format!(
                    "{dir} is the service's RuntimeDirectory=, which systemd deletes whenever the service stops, \
                     socket file included; put the socket elsewhere, such as /run/{}.sock",
                    args.name
                ));
            }
            Ok(())
        }
        ListenAddr::UnixAbstract { name, .. } => check_unit_value("abstract name", name),
    }
}

/// A value taken verbatim by a unit file directive: no control characters
/// (a line ends there), no backslash (it would continue the line or
/// escape), no surrounding blanks (systemd strips them).
pub(super) fn check_unit_value(what: &str, value: &str) -> Result<(), String> {
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("the {what} contains a control character, which a unit file cannot hold"));
    }
    if value.contains('\\') {
        return Err(format!("the {what} contains a backslash, which a unit file would read as an escape"));
    }
    if value.trim() != value {
        return Err(format!("the {what} starts or ends with a blank, which systemd would strip"));
    }
    Ok(())
}
