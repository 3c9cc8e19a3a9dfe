//! Static files below a root directory: safe path resolution, content
//! types, `HEAD` and `If-Modified-Since`.
//!
//! # Why requests cannot leave the root
//!
//! 1. The request path is split into segments *before* percent-decoding, and
//!    every decoded segment is checked: `..` (however encoded, `%2e%2e`
//!    included) is refused with 400, as is a segment that decodes to `/` or
//!    NUL. `.` and empty segments are dropped.
//! 2. The file is opened relative to a directory fd of the root with
//!    `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: the kernel refuses
//!    any resolution, symlinks included, that would leave the root (403).
//!    Symlinks that stay inside the root work. On kernels without
//!    `openat2` (before 5.6) each component is opened with `O_NOFOLLOW`
//!    instead: no symlinks at all, still safe.
//! 3. Only regular files are served (a FIFO or device under the root is
//!    403), opened with `O_NONBLOCK` so that a FIFO cannot stall a thread.
//!
//! Lookups block (open, stat, reading small files), so [`Files::respond`] is
//! meant for a blocking thread (`spawn_blocking`).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::body::Body;

/// Files up to this size are read in one go on the blocking thread; larger
/// ones are streamed.
pub const SMALL_FILE: u64 = 256 * 1024;

/// Served when a directory is requested with a trailing slash.
pub const INDEX_FILE: &str = "index.html";

/// The root directory could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    /// `open(2)` failed.
    #[error("cannot open the root directory {}: {source}; check --root", path.display())]
    OpenRoot {
        /// The root given.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Why a request path was refused before any lookup (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/` (e.g. `*` or an absolute URI's
    /// missing path).
    #[error("the request path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("bad percent-encoding at byte {at} of the request path")]
    BadEncoding {
        /// Byte offset of the `%`.
        at: usize,
    },
    /// A `..` segment, possibly percent-encoded.
    #[error("the request path contains a '..' segment; paths may not leave the served root")]
    DotDot,
    /// A segment decodes to a `/` or NUL byte.
    #[error("a segment of the request path decodes to '/' or NUL")]
    ForbiddenByte,
}

/// A request path checked and decoded, relative to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePath {
    /// Decoded segments joined with `/`; empty for the root itself.
    pub relative: Vec<u8>,
    /// Whether the request path ended with `/` (a directory is asked for).
    pub trailing_slash: bool,
}

/// Decodes and checks a request path (see the [module docs](self)).
pub fn decode_path(path: &str) -> Result<SafePath, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut relative = Vec::with_capacity(rest.len());
    let mut offset = 1;
    for raw in rest.split('/') {
        let segment = percent_decode(raw, offset)?;
        offset += raw.len() + 1;
        match segment.as_slice() {
            b"" | b"." => continue,
            b".." => return Err(PathError::DotDot),
            s if s.contains(&b'/') || s.contains(&0) => return Err(PathError::ForbiddenByte),
            s => {
                if !relative.is_empty() {
                    relative.push(b'/');
                }
                relative.extend_from_slice(s);
            }
        }
    }
    Ok(SafePath { relative, trailing_slash: path.ends_with('/') })
}

/// The `Location` of the redirect from a directory to its `/`-terminated
/// form, built from the *normalised* path rather than the raw one: a raw
/// `//dir` would give `//dir/`, which a browser reads as a URL of another
/// host (`http://dir/`), as it would `/\dir/`. Every byte outside the
/// URL's unreserved and sub-delimiter characters is percent-encoded, so
/// the result is a single-slash absolute path whatever the segments hold.
pub fn directory_location(relative: &[u8]) -> String {
    let mut location = String::with_capacity(relative.len() + 2);
    location.push('/');
    for &b in relative {
        let keep = b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b);
        if keep {
            location.push(b as char);
        } else {
            location.push_str(&format!("%{b:02X}"));
        }
    }
    if !relative.is_empty() {
        location.push('/');
    }
    location
}

/// Percent-decodes one segment; `offset` is its position in the full path,
/// for error messages.
fn percent_decode(raw: &str, offset: usize) -> Result<Vec<u8>, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => return Err(PathError::BadEncoding { at: offset + i }),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The `Content-Type` for a file name, by extension.
pub fn content_type(name: &[u8]) -> &'static str {
    let ext = match name.iter().rposition(|b| *b == b'.') {
        Some(dot) => &name[dot + 1..],
        None => return "application/octet-stream",
    };
    let ext = ext.to_ascii_lowercase();
    match ext.as_slice() {
        b"html" | b"htm" => "text/html; charset=utf-8",
        b"css" => "text/css; charset=utf-8",
        b"js" | b"mjs" => "text/javascript; charset=utf-8",
        b"json" | b"map" => "application/json",
        b"txt" | b"text" | b"log" => "text/plain; charset=utf-8",
        b"md" => "text/markdown; charset=utf-8",
        b"csv" => "text/csv; charset=utf-8",
        b"xml" => "application/xml",
        b"svg" => "image/svg+xml",
        b"png" => "image/png",
        b"jpg" | b"jpeg" => "image/jpeg",
        b"gif" => "image/gif",
        b"webp" => "image/webp",
        b"avif" => "image/avif",
        b"ico" => "image/x-icon",
        b"woff" => "font/woff",
        b"woff2" => "font/woff2",
        b"ttf" => "font/ttf",
        b"otf" => "font/otf",
        b"wasm" => "application/wasm",
        b"pdf" => "application/pdf",
        b"zip" => "application/zip",
        b"gz" => "application/gzip",
        b"mp4" => "video/mp4",
        b"webm" => "video/webm",
        b"mp3" => "audio/mpeg",
        b"ogg" => "audio/ogg",
        _ => "application/octet-stream",
    }
}

/// Set once `openat2` turned out to be missing (ENOSYS): every later lookup
/// takes the `O_NOFOLLOW` walk directly.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Static files below a root directory, held open as a directory fd: a
/// later rename or replacement of the path does not change what is served
/// (the next generation opens the new one).
#[derive(Debug)]
pub struct Files {
    root: OwnedFd,
    path: PathBuf,
}

/// The parts of a request a file lookup needs.
#[derive(Debug, Clone)]
pub struct FileRequest {
    /// `GET` or `HEAD` (others are refused before a lookup).
    pub method: Method,
    /// The raw (still percent-encoded) request path.
    pub path: String,
    /// The raw query, kept for directory redirects.
    pub query: Option<String>,
    /// `If-Modified-Since`, if sent.
    pub if_modified_since: Option<HeaderValue>,
}

/// A file found and opened.
struct Found {
    file: File,
    len: u64,
    mtime: SystemTime,
    content_type: &'static str,
}

/// Why a lookup found nothing servable.
enum Miss {
    NotFound,
    Forbidden,
    Redirect(String),
    Failed(std::io::Error),
}

impl Files {
    /// Opens the root directory (`O_PATH | O_DIRECTORY | O_CLOEXEC`).
    pub fn open(root: &Path) -> Result<Self, FilesError> {
        let fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| FilesError::OpenRoot { path: root.to_owned(), source: e.into() })?;
        Ok(Self { root: fd, path: root.to_owned() })
    }

    /// The root as given.
    pub fn root(&self) -> &Path {
        &self.path
    }

    /// Answers a `GET` or `HEAD` for a file. Blocks: call it on a blocking
    /// thread.
    pub fn respond(&self, req: &FileRequest) -> Response<Body> {
        let safe = match decode_path(&req.path) {
            Ok(p) => p,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        let found = match self.lookup(&safe, req) {
            Ok(f) => f,
            Err(Miss::NotFound) => return text(StatusCode::NOT_FOUND, "not found\n".into()),
            Err(Miss::Forbidden) => return text(StatusCode::FORBIDDEN, "forbidden\n".into()),
            Err(Miss::Redirect(location)) => {
                let mut r = text(StatusCode::MOVED_PERMANENTLY, format!("moved to {location}\n"));
                if let Ok(v) = HeaderValue::try_from(location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
            Err(Miss::Failed(e)) => {
                tracing::warn!(path = %req.path, error = %e, "file lookup failed");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into());
            }
        };
        let last_modified = httpdate::fmt_http_date(found.mtime);
        let mut builder = Response::builder().header(header::LAST_MODIFIED, &last_modified);
        if not_modified(found.mtime, req.if_modified_since.as_ref()) {
            return builder.status(StatusCode::NOT_MODIFIED).body(Body::empty()).unwrap_or_else(|_| internal());
        }
        builder = builder.header(header::CONTENT_TYPE, found.content_type).header(header::CONTENT_LENGTH, found.len);
        let body = if req.method == Method::HEAD {
            Ok(Body::empty())
        } else if found.len <= SMALL_FILE {
            read_small(found.file, found.len).map(Body::full)
        } else {
            Ok(Body::file(found.file, found.len))
        };
        match body {
            Ok(body) => builder.body(body).unwrap_or_else(|_| internal()),
            Err(e) => {
                tracing::warn!(path = %req.path, error = %e, "reading a file failed");
                internal()
            }
        }
    }

    fn lookup(&self, safe: &SafePath, req: &FileRequest) -> Result<Found, Miss> {
        let rel: &[u8] = if safe.relative.is_empty() { b"." } else { &safe.relative };
        let fd = self.open_beneath(rel)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Miss::Failed(e.into()))?;
        let (fd, st, name) = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory if !safe.trailing_slash => {
                let mut location = directory_location(&safe.relative);
                if let Some(q) = &req.query {
                    location.push('?');
                    location.push_str(q);
                }
                return Err(Miss::Redirect(location));
            }
            FileType::Directory => {
                drop(fd);
                let mut index = safe.relative.clone();
                if !index.is_empty() {
                    index.push(b'/');
                }
                index.extend_from_slice(INDEX_FILE.as_bytes());
                let fd = self.open_beneath(&index)?;
                let st = rustix::fs::fstat(&fd).map_err(|e| Miss::Failed(e.into()))?;
                (fd, st, INDEX_FILE.as_bytes())
            }
            // "/file.txt/" names a directory that does not exist.
            FileType::RegularFile if safe.trailing_slash => return Err(Miss::NotFound),
            _ => (fd, st, rel),
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Miss::Forbidden);
        }
        let name = name.rsplit(|b| *b == b'/').next().unwrap_or(name);
        let secs = u64::try_from(st.st_mtime).unwrap_or(0);
        Ok(Found {
            file: File::from(fd),
            len: u64::try_from(st.st_size).unwrap_or(0),
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            content_type: content_type(name),
        })
    }

    /// Opens `rel` below the root without ever leaving it.
    fn open_beneath(&self, rel: &[u8]) -> Result<OwnedFd, Miss> {
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let path = OsStr::from_bytes(rel);
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match rustix::fs::openat2(
                &self.root,
                path,
                flags,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                // openat2 fails with EAGAIN when a concurrent rename raced
                // the lookup; the walk below is as safe and does not.
                Err(Errno::AGAIN) => {}
                other => return other.map_err(miss),
            }
        }
        self.open_nofollow(rel, flags)
    }

    /// The fallback: one `openat(O_NOFOLLOW)` per component.
    fn open_nofollow(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, Miss> {
        let mut parts = rel.split(|b| *b == b'/').peekable();
        let mut dir: Option<OwnedFd> = None;
        while let Some(part) = parts.next() {
            let at = dir.as_ref().unwrap_or(&self.root);
            let name = OsStr::from_bytes(part);
            if parts.peek().is_none() {
                return rustix::fs::openat(at, name, flags | OFlags::NOFOLLOW, Mode::empty()).map_err(miss);
            }
            let next = rustix::fs::openat(
                at,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(miss)?;
            dir = Some(next);
        }
        Err(Miss::NotFound)
    }
}

fn miss(e: Errno) -> Miss {
    match e {
        Errno::NOENT | Errno::NOTDIR | Errno::NAMETOOLONG => Miss::NotFound,
        // EXDEV: RESOLVE_BENEATH caught an escape; ELOOP: a symlink where
        // O_NOFOLLOW forbids one.
        Errno::XDEV | Errno::LOOP | Errno::ACCESS | Errno::PERM | Errno::NXIO => Miss::Forbidden,
        other => Miss::Failed(other.into()),
    }
}

/// RFC 9110 §13.1.3: not modified if the file's time (whole seconds) is not
/// later than the given date. An unparsable date is ignored.
fn not_modified(mtime: SystemTime, if_modified_since: Option<&HeaderValue>) -> bool {
    let Some(since) = if_modified_since.and_then(|v| v.to_str().ok()).and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return false;
    };
    mtime <= since
}

fn read_small(mut file: File, len: u64) -> std::io::Result<Bytes> {
    // `len` is at most SMALL_FILE, so the cast cannot truncate.
    let mut buf = Vec::with_capacity(len as usize);
    // Read at most `len`: a file growing meanwhile must not change the
    // length already promised in Content-Length.
    (&mut file).take(len).read_to_end(&mut buf)?;
    if (buf.len() as u64) < len {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank while it was read"));
    }
    Ok(Bytes::from(buf))
}

/// A short `text/plain` response.
pub(crate) fn text(status: StatusCode, message: String) -> Response<Body> {
    let mut r = Response::new(Body::full(message));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// 500 with a fixed text; used where building a response failed.
pub(crate) fn internal() -> Response<Body> {
    text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into())
}

/// `HeaderMap` lookup shared by the service.
pub(crate) fn if_modified_since(headers: &HeaderMap) -> Option<HeaderValue> {
    headers.get(header::IF_MODIFIED_SINCE).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str) -> (String, bool) {
        let p = decode_path(path).unwrap();
        (String::from_utf8(p.relative).unwrap(), p.trailing_slash)
    }

    #[test]
    fn decodes_and_normalises() {
        assert_eq!(ok("/"), (String::new(), true));
        assert_eq!(ok("/a/b.txt"), ("a/b.txt".into(), false));
        assert_eq!(ok("//a/./b/"), ("a/b".into(), true));
        assert_eq!(ok("/with%20space"), ("with space".into(), false));
        assert_eq!(ok("/%2E"), (String::new(), false));
        assert_eq!(ok("/a..b/..c"), ("a..b/..c".into(), false));
    }

    #[test]
    fn refuses_traversal_and_bad_bytes() {
        for p in ["/..", "/../etc/passwd", "/a/../../b", "/%2e%2e/x", "/%2E%2e", "/.%2e/", "/a/%2e./b"] {
            assert_eq!(decode_path(p), Err(PathError::DotDot), "{p}");
        }
        for p in ["/a%2fb", "/..%2f..%2fetc", "/%00", "/a%2F"] {
            assert_eq!(decode_path(p), Err(PathError::ForbiddenByte), "{p}");
        }
        assert_eq!(decode_path("/%zz"), Err(PathError::BadEncoding { at: 1 }));
        assert_eq!(decode_path("/ab/%4"), Err(PathError::BadEncoding { at: 4 }));
        assert_eq!(decode_path("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn directory_redirects_stay_on_this_host() {
        let location = |p: &str| directory_location(&decode_path(p).unwrap().relative);
        assert_eq!(location("/sub"), "/sub/");
        assert_eq!(location("//sub"), "/sub/");
        assert_eq!(location("///a//b/./c"), "/a/b/c/");
        assert_eq!(location("//%5Cevil.example"), "/%5Cevil.example/");
        assert_eq!(location("/with%20space/%3F"), "/with%20space/%3F/");
        assert_eq!(location("/"), "/");
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type(b"index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type(b"A.PNG"), "image/png");
        assert_eq!(content_type(b"archive.tar.gz"), "application/gzip");
        assert_eq!(content_type(b"README"), "application/octet-stream");
        assert_eq!(content_type(b"x."), "application/octet-stream");
    }

    #[test]
    fn conditional_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let same = HeaderValue::try_from(httpdate::fmt_http_date(t)).unwrap();
        let before = HeaderValue::try_from(httpdate::fmt_http_date(t - Duration::from_secs(1))).unwrap();
        assert!(not_modified(t, Some(&same)));
        assert!(!not_modified(t, Some(&before)));
        assert!(!not_modified(t, Some(&HeaderValue::from_static("yesterday"))));
        assert!(!not_modified(t, None));
    }
}
