//! What openraft reads a snapshot from, and receives one into.
//!
//! A follower receives into a plain file ([`SnapshotData::file`]). A leader answers a
//! follower that needs a snapshot with a reader of a [`Build`]: the file is written on a
//! thread of its own from an engine snapshot taken at that moment, and the reader waits for
//! it only when it is first read or sought. So openraft's state-machine worker, which asks for
//! the snapshot between two applies, waits for the engine snapshot to be taken, not for the
//! whole store to be written (docs/PERFORMANCE.md, session 28). openraft sends a snapshot
//! from a task of its own, seeking to the end for the length and then chunk by chunk.
//!
//! Every reader of a build has its own position and reads with positional reads from one
//! shared open file, so the file may be replaced or removed (a newer snapshot) while a
//! follower is still being sent the old one.

use std::future::Future;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

/// Most bytes one positional read fetches.
const READ_CHUNK: usize = 1 << 20;

/// A snapshot's data: a file, or the file of a build that may still be running.
pub struct SnapshotData(Inner);

enum Inner {
    File(tokio::fs::File),
    Built(Reader),
}

impl SnapshotData {
    /// A file: one being received, or a finished snapshot's.
    pub fn file(file: tokio::fs::File) -> Self {
        Self(Inner::File(file))
    }

    /// The file this data was received into (`None` for a build's reader).
    pub fn into_file(self) -> Option<tokio::fs::File> {
        match self.0 {
            Inner::File(f) => Some(f),
            Inner::Built(_) => None,
        }
    }
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::File(_) => f.write_str("SnapshotData::File"),
            Inner::Built(r) => write!(f, "SnapshotData::Built(at {})", r.pos),
        }
    }
}

/// A snapshot file being written on another thread, shared by every reader.
pub struct Build {
    state: Mutex<State>,
}

enum State {
    Running(Vec<Waker>),
    Done(Result<(Arc<std::fs::File>, u64), String>),
}

impl Build {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Running(Vec::new())),
        })
    }

    /// A reader from the start of the file, which waits for the build when first used.
    pub fn reader(self: &Arc<Self>) -> SnapshotData {
        SnapshotData(Inner::Built(Reader {
            build: self.clone(),
            file: None,
            pos: 0,
            seek: None,
            chunk: Chunk::None,
        }))
    }

    /// Ends the build with the finished file (open for reading) or why it failed, and wakes
    /// every reader waiting for it. Only the first call counts.
    pub fn finish(&self, result: Result<std::fs::File, String>) {
        let done = result.and_then(|f| {
            let len = f.metadata().map_err(|e| e.to_string())?.len();
            Ok((Arc::new(f), len))
        });
        let wakers = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match &mut *s {
                State::Done(_) => return,
                State::Running(w) => {
                    let w = std::mem::take(w);
                    *s = State::Done(done);
                    w
                }
            }
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Whether the build ended in an error.
    pub fn failed(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        matches!(&*s, State::Done(Err(_)))
    }

    fn poll_done(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Arc<std::fs::File>, u64)>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *s {
            State::Running(wakers) => {
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
            State::Done(Ok((f, len))) => Poll::Ready(Ok((f.clone(), *len))),
            State::Done(Err(e)) => Poll::Ready(Err(io::Error::other(format!(
                "building the snapshot failed: {e}"
            )))),
        }
    }
}

/// Ends a build with an error if its thread ends (a panic included) without finishing it,
/// so that no reader waits forever.
pub struct Finisher(pub Arc<Build>);

impl Drop for Finisher {
    fn drop(&mut self) {
        self.0
            .finish(Err("the snapshot build ended without a result".into()));
    }
}

struct Reader {
    build: Arc<Build>,
    file: Option<(Arc<std::fs::File>, u64)>,
    pos: u64,
    seek: Option<SeekFrom>,
    chunk: Chunk,
}

enum Chunk {
    None,
    Reading(JoinHandle<io::Result<Vec<u8>>>, u64),
    Ready(Vec<u8>, u64),
}

impl Reader {
    fn poll_file(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Arc<std::fs::File>, u64)>> {
        if self.file.is_none() {
            self.file = Some(ready!(self.build.poll_done(cx))?);
        }
        Poll::Ready(Ok(self.file.clone().expect("set above")))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let (file, len) = ready!(self.poll_file(cx))?;
        loop {
            match &mut self.chunk {
                Chunk::Reading(handle, start) => {
                    let start = *start;
                    let data = ready!(Pin::new(handle).poll(cx)).map_err(io::Error::other)??;
                    if data.is_empty() {
                        self.chunk = Chunk::None;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("snapshot file ends at {start} of {len} bytes"),
                        )));
                    }
                    self.chunk = Chunk::Ready(data, start);
                }
                Chunk::Ready(data, start)
                    if *start <= self.pos && self.pos < *start + data.len() as u64 =>
                {
                    let from = (self.pos - *start) as usize;
                    let n = buf.remaining().min(data.len() - from);
                    buf.put_slice(&data[from..from + n]);
                    self.pos += n as u64;
                    return Poll::Ready(Ok(()));
                }
                _ => {
                    if self.pos >= len || buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let (file, at) = (file.clone(), self.pos);
                    let want = (len - at).min(READ_CHUNK as u64) as usize;
                    let handle = tokio::task::spawn_blocking(move || read_at(&file, at, want));
                    self.chunk = Chunk::Reading(handle, at);
                }
            }
        }
    }

    fn poll_complete(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let (_, len) = ready!(self.poll_file(cx))?;
        if let Some(to) = self.seek.take() {
            let target = match to {
                SeekFrom::Start(n) => Some(n),
                SeekFrom::End(d) => len.checked_add_signed(d),
                SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            };
            self.pos = target.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "seek before the start")
            })?;
        }
        Poll::Ready(Ok(self.pos))
    }
}

/// Up to `want` bytes of `file` from `at`, fewer only at its end.
fn read_at(file: &std::fs::File, at: u64, want: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; want];
    let mut n = 0;
    while n < want {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "a snapshot built for sending is read-only",
    )
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::File(f) => Pin::new(f).poll_read(cx, buf),
            Inner::Built(r) => r.poll_read(cx, buf),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        match &mut self.get_mut().0 {
            Inner::File(f) => Pin::new(f).start_seek(position),
            Inner::Built(r) => {
                r.seek = Some(position);
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match &mut self.get_mut().0 {
            Inner::File(f) => Pin::new(f).poll_complete(cx),
            Inner::Built(r) => r.poll_complete(cx),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            Inner::File(f) => Pin::new(f).poll_write(cx, buf),
            Inner::Built(_) => Poll::Ready(Err(read_only())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::File(f) => Pin::new(f).poll_flush(cx),
            Inner::Built(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::File(f) => Pin::new(f).poll_shutdown(cx),
            Inner::Built(_) => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    use super::*;

    fn file_with(bytes: &[u8]) -> io::Result<(tempfile::TempDir, std::path::PathBuf)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.snap");
        std::fs::File::create(&path)?.write_all(bytes)?;
        Ok((dir, path))
    }

    /// Reads as openraft's chunked sender does: the length from a seek to the end, then
    /// each chunk from a seek to its offset.
    async fn read_like_openraft(data: &mut SnapshotData, chunk: usize) -> io::Result<Vec<u8>> {
        let end = data.seek(SeekFrom::End(0)).await?;
        let mut out = Vec::new();
        while (out.len() as u64) < end {
            data.seek(SeekFrom::Start(out.len() as u64)).await?;
            let mut buf = Vec::with_capacity(chunk);
            while buf.capacity() > buf.len() {
                if data.read_buf(&mut buf).await? == 0 {
                    break;
                }
            }
            assert!(!buf.is_empty(), "no progress at {}", out.len());
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn readers_wait_for_the_build_then_each_reads_every_byte_from_its_own_position(
    ) -> anyhow::Result<()> {
        let content: Vec<u8> = (0..(3 * READ_CHUNK + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        let (_dir, path) = file_with(&content)?;
        let build = Build::new();
        let (mut a, mut b) = (build.reader(), build.reader());
        let first = tokio::spawn(async move { read_like_openraft(&mut a, 700_000).await });
        let second = tokio::spawn(async move { read_like_openraft(&mut b, 1 << 21).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !first.is_finished() && !second.is_finished(),
            "read before the build ended"
        );
        let file = std::fs::File::open(&path)?;
        // The file may go (a newer snapshot replaced it): the readers hold it open.
        std::fs::remove_file(&path)?;
        build.finish(Ok(file));
        assert_eq!(first.await??, content);
        assert_eq!(second.await??, content);
        assert!(!build.failed());
        // A reader made after the build ended reads at once, and seeks from anywhere.
        let mut late = build.reader();
        late.seek(SeekFrom::Start(5)).await?;
        late.seek(SeekFrom::Current(10)).await?;
        let mut three = [0u8; 3];
        late.read_exact(&mut three).await?;
        assert_eq!(three, content[15..18]);
        assert!(late.seek(SeekFrom::Current(-100)).await.is_err());
        assert!(
            late.write_all(b"x").await.is_err(),
            "a built snapshot is read-only"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_build_fails_its_readers_instead_of_leaving_them_waiting(
    ) -> anyhow::Result<()> {
        let build = Build::new();
        let mut r = build.reader();
        let waiting = tokio::spawn(async move { r.seek(SeekFrom::End(0)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        build.finish(Err("disk full".into()));
        let e = waiting.await?.expect_err("an error");
        assert!(e.to_string().contains("disk full"), "{e}");
        assert!(build.failed());
        // Only the first result counts.
        let (_dir, path) = file_with(b"late")?;
        build.finish(Ok(std::fs::File::open(&path)?));
        assert!(build.failed());

        let abandoned = Build::new();
        let mut r = abandoned.reader();
        let thread = std::thread::spawn({
            let f = Finisher(abandoned.clone());
            move || {
                let _f = f;
                panic!("the build thread died");
            }
        });
        assert!(thread.join().is_err());
        let mut buf = [0u8; 1];
        let e = r.read(&mut buf).await.expect_err("an error");
        assert!(e.to_string().contains("without a result"), "{e}");
        Ok(())
    }

    #[tokio::test]
    async fn a_file_that_ends_early_is_an_error_not_a_short_snapshot() -> anyhow::Result<()> {
        let (_dir, path) = file_with(&[7u8; 1000])?;
        let build = Build::new();
        build.finish(Ok(std::fs::File::open(&path)?));
        let mut r = build.reader();
        // Shrunk after its length was taken: reading must not loop or pass short data on.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(10)?;
        let mut all = Vec::new();
        let e = r.read_to_end(&mut all).await.expect_err("an error");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        Ok(())
    }

    #[tokio::test]
    async fn a_received_file_reads_writes_and_seeks_as_a_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("recv.tmp"))
            .await?;
        let mut d = SnapshotData::file(f);
        d.write_all(b"hello snapshot").await?;
        d.flush().await?;
        assert_eq!(read_like_openraft(&mut d, 4).await?, b"hello snapshot");
        assert!(d.into_file().is_some());
        assert!(Build::new().reader().into_file().is_none());
        Ok(())
    }
}
