//! The response body type: nothing, bytes in memory, or a file streamed in
//! chunks.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

/// Size of one chunk read from a streamed file.
const CHUNK: usize = 64 * 1024;

/// A response body. An enum rather than a boxed trait object, so that a
/// response costs no allocation beyond its data.
#[derive(Debug)]
pub struct Body {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Empty,
    Full(Option<Bytes>),
    File(FileBody),
}

#[derive(Debug)]
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    /// The chunk being filled; kept across `Pending`.
    buf: Option<BytesMut>,
}

impl Body {
    /// No body (`HEAD`, 304).
    pub fn empty() -> Self {
        Self { kind: Kind::Empty }
    }

    /// A body already in memory.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self { kind: if data.is_empty() { Kind::Empty } else { Kind::Full(Some(data)) } }
    }

    /// Exactly `len` bytes of `file`, read in chunks on tokio's blocking
    /// pool. A file that turns out shorter ends the body with an error, so
    /// the connection is aborted rather than left waiting for promised bytes.
    pub fn file(file: std::fs::File, len: u64) -> Self {
        let file = tokio::fs::File::from_std(file);
        Self { kind: Kind::File(FileBody { file, remaining: len, buf: None }) }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::File(f) => f.poll_chunk(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(data) => data.is_none(),
            Kind::File(f) => f.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::File(f) => SizeHint::with_exact(f.remaining),
        }
    }
}

impl FileBody {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        // `remaining` is positive; the chunk is at most CHUNK, so it fits usize.
        let want = self.remaining.min(CHUNK as u64) as usize;
        let buf = self.buf.get_or_insert_with(|| BytesMut::zeroed(want));
        let mut read = ReadBuf::new(&mut buf[..]);
        ready!(Pin::new(&mut self.file).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        if n == 0 {
            self.remaining = 0;
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was sent",
            ))));
        }
        let mut chunk = self.buf.take().unwrap_or_default();
        chunk.truncate(n);
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
    }
}
