//! Reading `/proc/<pid>/mountinfo`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// One line of `mountinfo`, the fields we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// File system type, e.g. `overlay`.
    pub fstype: String,
    /// Mount source, e.g. `baton-testbed` for our overlays.
    pub source: String,
}

/// Parses the text of a `mountinfo` file (see proc(5)); malformed lines are
/// skipped.
pub fn parse(mountinfo: &str) -> Vec<MountEntry> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = unescape(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            let fstype = right.next()?.to_owned();
            let source = unescape(right.next()?);
            Some(MountEntry { mount_point: PathBuf::from(mount_point), fstype, source })
        })
        .collect()
}

/// The mounts of our own mount namespace.
pub fn current() -> Result<Vec<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context(|| "reading /proc/self/mountinfo".into())?;
    Ok(parse(&text))
}

/// Mount points of our mount namespace at or below `dir`.
pub(crate) fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(current()?.into_iter().map(|m| m.mount_point).filter(|m| m.starts_with(dir)).collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(b) = u8::try_from(value) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let text = "67 42 0:41 / / rw,relatime - overlay baton-testbed rw,lowerdir=/\n\
                    81 67 254:0 /a /var/tmp/with\\040space rw - ext4 /dev/vda rw\n\
                    garbage\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!(m[0].fstype, "overlay");
        assert_eq!(m[0].source, "baton-testbed");
        assert_eq!(m[1].mount_point, Path::new("/var/tmp/with space"));
        assert_eq!(m[1].source, "/dev/vda");
    }
}
