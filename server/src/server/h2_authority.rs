//! [`H2AuthorityStream`]: an inbound connection adapter that repairs the HTTP/2 `:authority` of
//! clients that send a whole URL there.
//!
//! etcdctl 3.4 dials its per-endpoint clients (`endpoint status`, `endpoint hashkv`, ...) through
//! grpc-go's passthrough resolver as `passthrough:///http://127.0.0.1:2379`, and grpc-go then sends
//! `:authority: http://127.0.0.1:2379`. etcd's Go server ignores the authority; the `h2` crate under
//! hyper refuses the stream with RST_STREAM(PROTOCOL_ERROR) ("malformed authority") and has no
//! switch to accept it. This adapter sits between the accepted socket and hyper and turns the value
//! into `127.0.0.1:2379` before hyper parses it.
//!
//! # How
//! - The first bytes decide. A connection that does not open with the HTTP/2 client preface (the
//!   JSON gateway, `/metrics` and `/health` over HTTP/1.1) is passed through untouched; once the
//!   first bytes are seen that costs one branch per read. The preface itself is forwarded as it
//!   arrives, so detection buffers nothing.
//! - On an HTTP/2 connection the client→server bytes are walked frame by frame. Frames other than
//!   HEADERS/CONTINUATION (DATA, SETTINGS, WINDOW_UPDATE, PING, ...) are left where they were read,
//!   in hyper's own buffer: DATA is not copied unless it arrives in the same read as a header frame.
//! - The connection's first header block decides the rest (a gRPC client sends one `:authority`
//!   per connection; etcdctl's per-endpoint connections send the URL on every call). It is
//!   collected as read (HEADERS + any CONTINUATION) and decoded with a decoder that mirrors the
//!   client's HPACK encoder from the start. If no `:authority` in it needs a fix (or it has none),
//!   the block's frames go to hyper exactly as read, and so does everything after them, for good:
//!   hyper's decoder has then seen every byte of the client's encoding, so its dynamic table
//!   matches the client's, and the adapter costs one branch per read, as for HTTP/1.1. Well-behaved
//!   clients (etcd's Go client v3.5, kube-apiserver, tonic) only ever take this path, paying one
//!   block's decoding per connection. A later block of such a connection is not looked at, even if
//!   its `:authority` is a URL.
//! - Otherwise the connection is rewritten to its end. Header blocks are HPACK, whose dynamic table
//!   is state that the client's encoder and hyper's decoder keep in step. Editing one value in
//!   place would change that table's contents and entry sizes, so *every* block, the first one
//!   included, is decoded with the mirroring decoder and re-encoded as "literal without indexing"
//!   fields (RFC 7541 §6.2.2; names from the static table where they appear there). hyper's
//!   dynamic table then stays empty for the whole connection and there is no encoder state to keep
//!   in step; the blocks grow a little on loopback/LAN (no Huffman, no references), and each costs
//!   ~15 µs of decoding (the decoder rebuilds its Huffman table per Huffman string), which only
//!   etcdctl 3.4's per-endpoint commands pay. Dynamic table size updates from the client are
//!   consumed by our decoder and not forwarded: hyper's table is empty whatever its size.
//! - A re-encoded block is split into HEADERS + CONTINUATION frames of at most 16,384 bytes, the
//!   smallest SETTINGS_MAX_FRAME_SIZE a peer may advertise, so the frames fit whatever hyper
//!   advertises. END_STREAM and PRIORITY data are kept; PADDED padding is dropped.
//! - Writes (server→client) pass straight through.
//!
//! # Worked example
//! etcdctl's first `Maintenance/Status` call carries `:authority: http://127.0.0.1:2379` as a
//! Huffman-coded literal *with incremental indexing*: its encoder adds it to the dynamic table as
//! entry 62 and the next call sends just `0xbe` ("entry 62"). That first block puts the connection
//! in rewrite mode. Our decoder adds the same entry, so `0xbe` decodes to `http://127.0.0.1:2379`
//! again and is rewritten again; hyper receives `0x01 0x0e "127.0.0.1:2379"` ("static name 1,
//! literal value, not indexed") both times. A client whose first block carries
//! `127.0.0.1:2379` has its `0xbe` forwarded as is: hyper added the same entry 62 itself.
//!
//! # Malformed input
//! What HTTP/2 makes a connection error (CONTINUATION out of place, padding longer than the frame,
//! an HPACK decoding error, PUSH_PROMISE from a client), or a header block over this adapter's
//! limits, fails the read with `InvalidData` once the bytes before it are delivered: hyper drops
//! the connection, as it would have (minus the GOAWAY). That holds up to the end of the first
//! header block and, in rewrite mode, to the end of the connection; after a first block that
//! needs no fix, hyper alone judges the bytes. A connection that ends inside a header frame ends
//! there. Nothing here panics or waits for bytes it does not need.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use loona_hpack::decoder::DecoderError;
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::coalesce::Coalescer;

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;

/// The largest frame payload we emit: the minimum SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2).
const MAX_OUT_FRAME_PAYLOAD: usize = 16_384;
/// The SETTINGS_HEADER_TABLE_SIZE the server advertises, which bounds the client's dynamic table.
/// tonic leaves hyper at the protocol default; raise this with it if that ever changes, or
/// clients that use the larger table will be disconnected.
const SERVER_HEADER_TABLE_SIZE: usize = 4_096;
/// Encoded bytes of one header block (all its frames) we are prepared to buffer.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// The first header block's frames as read (headers, padding and empty CONTINUATIONs included)
/// that we are prepared to keep for forwarding.
const MAX_FIRST_BLOCK_FRAMES: usize = 2 * MAX_HEADER_BLOCK;
/// Decoded size of one header list (RFC 7541 §4.1: name + value + 32 per field). hyper advertises
/// 16 KiB and answers larger lists with a stream error; we close the connection only beyond this,
/// which also bounds a re-encoded block to 4 frames (hyper accepts 5 CONTINUATIONs).
const MAX_HEADER_LIST_SIZE: usize = 64 * 1024;

/// An accepted connection whose HTTP/2 request headers get a usable `:authority` (see the module
/// docs). Everything else it reads is unchanged; once the connection has sent the HTTP/2
/// preface, what it writes goes through a `Coalescer` (fewer, larger writes, the same bytes).
pub struct H2AuthorityStream<T> {
    inner: T,
    mode: Mode,
    /// The write side once the connection is known to be HTTP/2 (fewer, larger writes; see
    /// [`super::coalesce`]). HTTP/1.1 connections write straight through.
    coalesce: Option<Coalescer>,
}

enum Mode {
    /// This many bytes have been read so far, all of them a prefix of [`PREFACE`].
    Detect(usize),
    /// Not HTTP/2 with prior knowledge, or HTTP/2 whose first header block needed no fix: bytes
    /// go through untouched.
    Passthrough,
    /// The preface has been read; frames after it go through the rewriter.
    Http2(Box<Rewriter>),
}

impl<T> H2AuthorityStream<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            mode: Mode::Detect(0),
            coalesce: None,
        }
    }
}

impl<T: AsyncRead + Unpin> H2AuthorityStream<T> {
    fn poll_detect(
        &mut self,
        seen: usize,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let new = buf.filled().get(start..).unwrap_or_default();
        let want = PREFACE.get(seen..).unwrap_or_default();
        let n = new.len().min(want.len());
        if new.get(..n) != want.get(..n) {
            self.mode = Mode::Passthrough;
            return Poll::Ready(Ok(()));
        }
        if seen + n < PREFACE.len() {
            // Still a prefix of the preface (or end of stream): keep watching.
            self.mode = Mode::Detect(seen + n);
            return Poll::Ready(Ok(()));
        }
        // The preface is complete; whatever follows it in this read is the first frames.
        self.coalesce = Some(Coalescer::default());
        let mut rewriter = Box::new(Rewriter::new());
        rewriter.take_in_place(buf, start + n);
        self.mode = Mode::Http2(rewriter);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H2AuthorityStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.mode {
            Mode::Passthrough => Pin::new(&mut this.inner).poll_read(cx, buf),
            Mode::Detect(seen) => {
                let seen = *seen;
                this.poll_detect(seen, cx, buf)
            }
            Mode::Http2(rewriter) => {
                let res = rewriter.poll_read(&mut this.inner, cx, buf);
                if rewriter.is_done() {
                    // Everything it held is delivered: drop its buffers and decoder.
                    this.mode = Mode::Passthrough;
                }
                res
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H2AuthorityStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.coalesce {
            Some(c) => c.poll_write_vectored(&mut this.inner, cx, &[io::IoSlice::new(buf)]),
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.coalesce {
            Some(c) => c.poll_flush(&mut this.inner, cx),
            None => Pin::new(&mut this.inner).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.coalesce {
            Some(c) => c.poll_shutdown(&mut this.inner, cx),
            None => Pin::new(&mut this.inner).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.coalesce {
            Some(c) => c.poll_write_vectored(&mut this.inner, cx, bufs),
            None => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // h2 asks once, before the preface is read; the coalescer takes slices either way.
        self.inner.is_write_vectored()
    }
}

impl<T: Connected> Connected for H2AuthorityStream<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Why a connection's input cannot be rewritten.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Malformed {
    #[error("CONTINUATION frame outside a header block")]
    UnexpectedContinuation,
    #[error("frame other than CONTINUATION inside a header block")]
    InterleavedFrame,
    #[error("PUSH_PROMISE frame from a client")]
    PushPromise,
    #[error("HEADERS frame shorter than its padding and priority fields")]
    BadPadding,
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    #[error("header list larger than {MAX_HEADER_LIST_SIZE} bytes")]
    ListTooLarge,
    #[error("HPACK decoding: {0}")]
    Hpack(DecoderError),
}

/// Where the next unprocessed client byte falls.
#[derive(Debug, Clone, Copy)]
enum FrameState {
    /// At the start of a frame header.
    Head,
    /// Inside the payload of a frame that is forwarded as is; this many bytes of it remain.
    Skip(usize),
}

struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHead {
    /// Parses the 9-byte frame header at the start of `bytes`, if `bytes` holds one.
    fn parse(bytes: &[u8]) -> Option<Self> {
        let head: &[u8; FRAME_HEADER_LEN] = bytes.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = *head;
        Some(Self {
            len: u32::from_be_bytes([0, l0, l1, l2]) as usize,
            kind,
            flags,
            stream_id: u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff,
        })
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// What the connection's first header block decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No header block has ended yet: header frames are collected, and also kept as read.
    Probe,
    /// The first block had an `:authority` to fix: every block is decoded and re-encoded.
    Rewrite,
    /// The first block had none: it went out as read, and everything after it goes through.
    Passthrough,
}

/// A header block whose HEADERS frame has been read and whose END_HEADERS has not.
struct OpenBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
}

/// The HTTP/2 side of [`H2AuthorityStream`]: a frame walker and the HPACK state of one connection.
struct Rewriter {
    /// Mirrors the client's HPACK encoder.
    decoder: Decoder<'static>,
    phase: Phase,
    /// In [`Phase::Probe`], the frames of the open first block exactly as read.
    first_block: Vec<u8>,
    frame: FrameState,
    block: Option<OpenBlock>,
    /// Client bytes read but not yet processed: a header frame being collected, and what was
    /// read after it.
    pending_in: BytesMut,
    /// Processed bytes the caller has not taken yet.
    pending_out: BytesMut,
    /// Reported once `pending_out` has been delivered.
    failed: Option<Malformed>,
    eof: bool,
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(SERVER_HEADER_TABLE_SIZE);
        Self {
            decoder,
            phase: Phase::Probe,
            first_block: Vec::new(),
            frame: FrameState::Head,
            block: None,
            pending_in: BytesMut::new(),
            pending_out: BytesMut::new(),
            failed: None,
            eof: false,
        }
    }

    /// Whether the connection is in passthrough and nothing held here is left to deliver.
    fn is_done(&self) -> bool {
        self.phase == Phase::Passthrough && self.pending_out.is_empty()
    }

    fn poll_read<T: AsyncRead + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !self.pending_out.is_empty() {
                let n = self.pending_out.len().min(buf.remaining());
                buf.put_slice(self.pending_out.get(..n).unwrap_or_default());
                self.pending_out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = self.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            if self.phase == Phase::Passthrough {
                // `pending_in` went to `pending_out` at the switch.
                return Pin::new(inner).poll_read(cx, buf);
            }
            if self.pending_in.is_empty() {
                // Fast path: read straight into the caller's buffer and keep what needs no change.
                let start = buf.filled().len();
                ready!(Pin::new(&mut *inner).poll_read(cx, buf))?;
                if buf.filled().len() == start {
                    return Poll::Ready(Ok(())); // end of stream
                }
                self.take_in_place(buf, start);
                if buf.filled().len() > start {
                    return Poll::Ready(Ok(()));
                }
                // Everything read starts a header frame (or is a failure): process it below.
                continue;
            }
            let needed = match self.process_pending() {
                Ok(needed) => needed,
                Err(e) => {
                    self.fail(e);
                    continue;
                }
            };
            if !self.pending_out.is_empty() || self.pending_in.is_empty() {
                continue;
            }
            // A frame in `pending_in` is incomplete: read exactly what it lacks, so that whatever
            // follows it takes the fast path.
            if ready!(self.poll_fill(inner, cx, needed))? == 0 {
                // The client stopped inside a frame: so does the stream hyper sees.
                self.pending_in.clear();
                self.eof = true;
            }
        }
    }

    fn fail(&mut self, e: Malformed) {
        tracing::debug!(error = %e, "closing HTTP/2 connection: cannot rewrite its headers");
        self.failed = Some(e);
        self.pending_in.clear();
    }

    /// Reads up to `needed` more bytes (at least one) into `pending_in`; `Ok(0)` at end of stream.
    fn poll_fill<T: AsyncRead + Unpin>(
        &mut self,
        inner: &mut T,
        cx: &mut Context<'_>,
        needed: usize,
    ) -> Poll<io::Result<usize>> {
        let len = self.pending_in.len();
        self.pending_in.resize(len + needed.max(1), 0);
        let mut read = ReadBuf::new(self.pending_in.get_mut(len..).unwrap_or_default());
        let res = Pin::new(inner).poll_read(cx, &mut read);
        let n = read.filled().len();
        self.pending_in.truncate(len + n);
        res.map_ok(|()| n)
    }

    /// Walks bytes just read into `buf[start..]`. What can reach the caller unchanged stays; from
    /// the first header frame (or incomplete frame header) on, bytes move to `pending_in`.
    fn take_in_place(&mut self, buf: &mut ReadBuf<'_>, start: usize) {
        let new = buf.filled().get(start..).unwrap_or_default();
        let (keep, failure) = match self.scan(new) {
            Ok(keep) => (keep, None),
            Err((keep, e)) => (keep, Some(e)),
        };
        if keep < new.len() {
            if failure.is_none() {
                self.pending_in
                    .extend_from_slice(new.get(keep..).unwrap_or_default());
            }
            buf.set_filled(start + keep);
        }
        if let Some(e) = failure {
            self.fail(e);
        }
    }

    /// How many leading bytes of `new` pass unchanged; on failure, with the bytes before the
    /// offending frame.
    fn scan(&mut self, new: &[u8]) -> Result<usize, (usize, Malformed)> {
        let mut pos = 0;
        while pos < new.len() {
            match self.frame {
                FrameState::Skip(n) => {
                    let k = n.min(new.len() - pos);
                    pos += k;
                    self.frame = if k == n {
                        FrameState::Head
                    } else {
                        FrameState::Skip(n - k)
                    };
                }
                FrameState::Head => {
                    let Some(head) = new.get(pos..).and_then(FrameHead::parse) else {
                        break;
                    };
                    if self.is_header_frame(&head).map_err(|e| (pos, e))? {
                        break;
                    }
                    pos += FRAME_HEADER_LEN;
                    self.frame = FrameState::Skip(head.len);
                }
            }
        }
        Ok(pos)
    }

    /// Whether a frame must be collected and rewritten rather than forwarded; an error for frames
    /// HTTP/2 does not allow here.
    fn is_header_frame(&self, head: &FrameHead) -> Result<bool, Malformed> {
        let header = match (&self.block, head.kind) {
            (Some(block), TYPE_CONTINUATION) if block.stream_id == head.stream_id => true,
            (Some(_), _) => return Err(Malformed::InterleavedFrame),
            (None, TYPE_CONTINUATION) => return Err(Malformed::UnexpectedContinuation),
            (None, TYPE_PUSH_PROMISE) => return Err(Malformed::PushPromise),
            (None, kind) => kind == TYPE_HEADERS,
        };
        if header && head.len > MAX_HEADER_BLOCK {
            return Err(Malformed::BlockTooLarge);
        }
        Ok(header)
    }

    /// Processes `pending_in` as far as it goes. Returns how many more bytes the frame at its
    /// start needs (0 when `pending_in` was used up).
    fn process_pending(&mut self) -> Result<usize, Malformed> {
        loop {
            match self.frame {
                FrameState::Skip(n) => {
                    if self.pending_in.is_empty() {
                        return Ok(0);
                    }
                    let k = n.min(self.pending_in.len());
                    self.pending_out
                        .extend_from_slice(&self.pending_in.split_to(k));
                    self.frame = if k == n {
                        FrameState::Head
                    } else {
                        FrameState::Skip(n - k)
                    };
                }
                FrameState::Head => {
                    let Some(head) = FrameHead::parse(&self.pending_in) else {
                        return Ok(FRAME_HEADER_LEN - self.pending_in.len());
                    };
                    if !self.is_header_frame(&head)? {
                        self.pending_out
                            .extend_from_slice(&self.pending_in.split_to(FRAME_HEADER_LEN));
                        self.frame = FrameState::Skip(head.len);
                        continue;
                    }
                    let frame_len = FRAME_HEADER_LEN + head.len;
                    if self.pending_in.len() < frame_len {
                        return Ok(frame_len - self.pending_in.len());
                    }
                    let frame = self.pending_in.split_to(frame_len);
                    if self.phase == Phase::Probe {
                        if self.first_block.len() + frame.len() > MAX_FIRST_BLOCK_FRAMES {
                            return Err(Malformed::BlockTooLarge);
                        }
                        self.first_block.extend_from_slice(&frame);
                    }
                    self.header_frame(&head, frame.get(FRAME_HEADER_LEN..).unwrap_or_default())?;
                    if self.phase == Phase::Passthrough {
                        // The first block ended at this frame boundary and went out as read;
                        // whatever was read after it follows unexamined.
                        self.pending_out.extend_from_slice(&self.pending_in);
                        self.pending_in = BytesMut::new();
                        return Ok(0);
                    }
                }
            }
        }
    }

    /// Adds a HEADERS or CONTINUATION frame to the open block; rewrites the block when it ends.
    fn header_frame(&mut self, head: &FrameHead, payload: &[u8]) -> Result<(), Malformed> {
        if head.kind == TYPE_HEADERS {
            let mut body = payload;
            let mut pad = 0;
            if head.has(FLAG_PADDED) {
                let (&len, rest) = body.split_first().ok_or(Malformed::BadPadding)?;
                pad = usize::from(len);
                body = rest;
            }
            let mut priority = None;
            if head.has(FLAG_PRIORITY) {
                let (fields, rest) = body
                    .split_at_checked(PRIORITY_LEN)
                    .ok_or(Malformed::BadPadding)?;
                priority = fields.try_into().ok();
                body = rest;
            }
            let end = body.len().checked_sub(pad).ok_or(Malformed::BadPadding)?;
            self.block = Some(OpenBlock {
                stream_id: head.stream_id,
                end_stream: head.has(FLAG_END_STREAM),
                priority,
                fragment: body.get(..end).unwrap_or_default().to_vec(),
            });
        } else {
            // `is_header_frame` let a CONTINUATION through only with an open block.
            let block = self
                .block
                .as_mut()
                .ok_or(Malformed::UnexpectedContinuation)?;
            if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                return Err(Malformed::BlockTooLarge);
            }
            block.fragment.extend_from_slice(payload);
        }
        if head.has(FLAG_END_HEADERS) {
            if let Some(block) = self.block.take() {
                self.finish_block(&block)?;
            }
        }
        Ok(())
    }

    /// Decodes a complete header block and fixes its `:authority`. The connection's first block
    /// goes to `pending_out` as read if it needed no fix (and the connection to passthrough);
    /// otherwise the block is written re-encoded, as HEADERS + CONTINUATION frames.
    fn finish_block(&mut self, block: &OpenBlock) -> Result<(), Malformed> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let mut list_size = 0usize;
        let mut fixed_any = false;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size > MAX_HEADER_LIST_SIZE {
                    return; // reported below; indexed fields cost no copies meanwhile
                }
                if *name == *b":authority" {
                    match fix_authority(&value) {
                        Some(fixed) => {
                            fixed_any = true;
                            // Nothing of an authority left: leave it out.
                            if !fixed.is_empty() {
                                encode_field(&mut encoded, &name, fixed);
                            }
                        }
                        None => encode_field(&mut encoded, &name, &value),
                    }
                } else {
                    encode_field(&mut encoded, &name, &value);
                }
            })
            .map_err(Malformed::Hpack)?;
        if list_size > MAX_HEADER_LIST_SIZE {
            return Err(Malformed::ListTooLarge);
        }
        if self.phase == Phase::Probe {
            let first_block = std::mem::take(&mut self.first_block);
            if !fixed_any {
                self.pending_out.extend_from_slice(&first_block);
                self.phase = Phase::Passthrough;
                return Ok(());
            }
            tracing::debug!("HTTP/2 connection sends a URL as :authority: rewriting its headers");
            self.phase = Phase::Rewrite;
        }

        let out = &mut self.pending_out;
        let priority_len = block.priority.map_or(0, |p| p.len());
        let (first, mut rest) =
            encoded.split_at(encoded.len().min(MAX_OUT_FRAME_PAYLOAD - priority_len));
        let mut flags = 0;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if block.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        put_frame_head(
            out,
            priority_len + first.len(),
            TYPE_HEADERS,
            flags,
            block.stream_id,
        );
        if let Some(priority) = &block.priority {
            out.extend_from_slice(priority);
        }
        out.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_OUT_FRAME_PAYLOAD));
            rest = tail;
            let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
            put_frame_head(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream_id);
            out.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// The authority a client meant when it sent a URL: `http://127.0.0.1:2379/` → `127.0.0.1:2379`.
/// Drops a `scheme://` prefix and anything from the first `/` after it (no valid authority has a
/// `/`). `None` when `value` needs no change.
fn fix_authority(value: &[u8]) -> Option<&[u8]> {
    let rest = match value.windows(3).position(|w| w == b"://") {
        Some(i) if is_scheme(value.get(..i).unwrap_or_default()) => {
            value.get(i + 3..).unwrap_or_default()
        }
        _ => value,
    };
    let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    let fixed = rest.get(..end).unwrap_or_default();
    (fixed.len() != value.len()).then_some(fixed)
}

/// RFC 3986 §3.1: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &[u8]) -> bool {
    s.first().is_some_and(u8::is_ascii_alphabetic)
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

fn put_frame_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    // `len` is at most MAX_OUT_FRAME_PAYLOAD, well inside the 24-bit length field.
    let [_, l0, l1, l2] = (len as u32).to_be_bytes();
    out.extend_from_slice(&[l0, l1, l2, kind, flags]);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// Appends a "literal header field without indexing" (RFC 7541 §6.2.2) with a raw (not Huffman)
/// value, and the name by static-table index when it has one.
fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    match static_name_index(name) {
        Some(index) => encode_integer(out, 0x00, 4, index),
        None => {
            out.push(0x00);
            encode_string(out, name);
        }
    }
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// RFC 7541 §5.1: `value` in the low `prefix_bits` bits of a first byte that starts with `first`.
fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The first static-table entry (RFC 7541 Appendix A) with this name.
fn static_name_index(name: &[u8]) -> Option<usize> {
    let index = match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-charset" => 15,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept-ranges" => 18,
        b"accept" => 19,
        b"access-control-allow-origin" => 20,
        b"age" => 21,
        b"allow" => 22,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-disposition" => 25,
        b"content-encoding" => 26,
        b"content-language" => 27,
        b"content-length" => 28,
        b"content-location" => 29,
        b"content-range" => 30,
        b"content-type" => 31,
        b"cookie" => 32,
        b"date" => 33,
        b"etag" => 34,
        b"expect" => 35,
        b"expires" => 36,
        b"from" => 37,
        b"host" => 38,
        b"if-match" => 39,
        b"if-modified-since" => 40,
        b"if-none-match" => 41,
        b"if-range" => 42,
        b"if-unmodified-since" => 43,
        b"last-modified" => 44,
        b"link" => 45,
        b"location" => 46,
        b"max-forwards" => 47,
        b"proxy-authenticate" => 48,
        b"proxy-authorization" => 49,
        b"range" => 50,
        b"referer" => 51,
        b"refresh" => 52,
        b"retry-after" => 53,
        b"server" => 54,
        b"set-cookie" => 55,
        b"strict-transport-security" => 56,
        b"transfer-encoding" => 57,
        b"user-agent" => 58,
        b"vary" => 59,
        b"via" => 60,
        b"www-authenticate" => 61,
        _ => return None,
    };
    Some(index)
}

#[cfg(test)]
mod tests;
