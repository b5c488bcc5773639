//! gRPC messages cut out of a response's HTTP/2 DATA frames in place.
//!
//! A gRPC message on the wire is a 5-byte prefix (a compression flag, then the length as a
//! big-endian `u32`) and the message's bytes; a DATA frame holds any run of those bytes.
//! tonic's `Streaming` copies every frame into one buffer and decodes each message from
//! there: at watch-events that copy (`memmove`, and `BytesMut`'s bookkeeping behind it) was
//! ~12 % of the load tool's samples, each of the server's 16 KiB frames holding ~150 watch
//! responses. A [`Deframer`] hands out a message that lies whole in one frame as a slice of
//! that frame (a `Bytes` sharing the frame's buffer), and copies only a message that is split
//! between frames (at most one per frame) into a buffer of its own.

use bytes::{Bytes, BytesMut};

/// The largest message taken by default: tonic's default limit for a decoded message.
pub const DEFAULT_MAX_MESSAGE: usize = 4 << 20;

/// Cuts the messages out of one response stream's DATA frames, in order.
#[derive(Debug)]
pub struct Deframer {
    /// The start of a message that the next frame goes on with (its prefix, maybe in part).
    partial: BytesMut,
    max: usize,
}

impl Deframer {
    /// A deframer that refuses messages longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            partial: BytesMut::new(),
            max,
        }
    }

    /// Whether no message is left half-read: at the end of the stream, anything else means
    /// the stream was cut short.
    pub fn is_between_messages(&self) -> bool {
        self.partial.is_empty()
    }

    /// Reads one DATA frame, passing every message it completes to `each`, in order.
    pub fn feed(
        &mut self,
        frame: &Bytes,
        mut each: impl FnMut(Bytes) -> Result<(), tonic::Status>,
    ) -> Result<(), tonic::Status> {
        let mut rest: &[u8] = frame;
        if !self.partial.is_empty() {
            if self.partial.len() < 5 {
                let take = (5 - self.partial.len()).min(rest.len());
                self.partial.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.partial.len() < 5 {
                    return Ok(());
                }
            }
            let whole = 5 + self.message_len(&self.partial[..5])?;
            let take = (whole - self.partial.len()).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() < whole {
                return Ok(());
            }
            each(self.partial.split().freeze().slice(5..))?;
        }
        while !rest.is_empty() {
            let whole = match rest.get(..5) {
                Some(prefix) => 5 + self.message_len(prefix)?,
                None => rest.len() + 1,
            };
            let Some(message) = rest.get(5..whole) else {
                self.partial.reserve(whole.max(5));
                self.partial.extend_from_slice(rest);
                return Ok(());
            };
            each(frame.slice_ref(message))?;
            rest = &rest[whole..];
        }
        Ok(())
    }

    /// The length a message's 5-byte prefix gives, checked.
    fn message_len(&self, prefix: &[u8]) -> Result<usize, tonic::Status> {
        match prefix[0] {
            0 => {}
            1 => {
                return Err(tonic::Status::internal(
                    "a compressed message, but the tool asks for no compression",
                ))
            }
            flag => {
                return Err(tonic::Status::internal(format!(
                    "protocol error: a message's compression flag is {flag}, not 0 or 1"
                )))
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max {
            return Err(tonic::Status::out_of_range(format!(
                "decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max
            )));
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    fn feed_all(d: &mut Deframer, frames: &[&[u8]]) -> Result<Vec<Vec<u8>>, tonic::Status> {
        let mut got = Vec::new();
        for f in frames {
            d.feed(&Bytes::copy_from_slice(f), |m| {
                got.push(m.to_vec());
                Ok(())
            })?;
        }
        Ok(got)
    }

    #[test]
    fn messages_come_out_whole_wherever_the_frames_split_them() -> Result<(), tonic::Status> {
        let messages: [&[u8]; 4] = [b"first", b"", b"a third, longer message", b"4"];
        let wire = framed(&messages);
        let want: Vec<Vec<u8>> = messages.iter().map(|m| m.to_vec()).collect();
        // Every way of cutting the bytes into two and into three frames.
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let mut d = Deframer::new(DEFAULT_MAX_MESSAGE);
                let got = feed_all(&mut d, &[&wire[..a], &wire[a..b], &wire[b..]])?;
                assert_eq!(got, want, "cut at {a} and {b}");
                assert!(d.is_between_messages());
            }
        }
        // One byte per frame.
        let mut d = Deframer::new(DEFAULT_MAX_MESSAGE);
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(feed_all(&mut d, &bytes)?, want);
        Ok(())
    }

    #[test]
    fn a_message_whole_in_its_frame_is_not_copied() -> Result<(), tonic::Status> {
        let frame = Bytes::from(framed(&[b"first", b"second"]));
        let mut d = Deframer::new(DEFAULT_MAX_MESSAGE);
        let mut got = Vec::new();
        d.feed(&frame, |m| {
            got.push(m);
            Ok(())
        })?;
        assert_eq!(got, [&b"first"[..], &b"second"[..]]);
        let inside = frame.as_ptr_range();
        for m in &got {
            assert!(inside.contains(&m.as_ptr()), "{m:?} is a copy");
        }
        Ok(())
    }

    #[test]
    fn a_stream_cut_mid_message_is_seen() -> Result<(), tonic::Status> {
        let wire = framed(&[b"whole", b"cut short"]);
        for cut in [wire.len() - 1, 12, 13] {
            let mut d = Deframer::new(DEFAULT_MAX_MESSAGE);
            let got = feed_all(&mut d, &[&wire[..cut]])?;
            assert_eq!(got, vec![b"whole".to_vec()], "cut at {cut}");
            assert!(!d.is_between_messages(), "cut at {cut}");
        }
        Ok(())
    }

    #[test]
    fn compressed_and_oversized_messages_are_errors() {
        let mut d = Deframer::new(4);
        let err = d.feed(&framed(&[b"12345"]).into(), |_| Ok(())).err();
        assert_eq!(err.map(|s| s.code()), Some(tonic::Code::OutOfRange));
        let mut d = Deframer::new(4);
        // The limit holds for a message whose prefix arrives in pieces, too.
        let wire = framed(&[b"12345"]);
        let wire = Bytes::from(wire);
        assert!(d.feed(&wire.slice(..3), |_| Ok(())).is_ok());
        let err = d.feed(&wire.slice(3..), |_| Ok(())).err();
        assert_eq!(err.map(|s| s.code()), Some(tonic::Code::OutOfRange));
        for flag in [1u8, 7] {
            let mut wire = framed(&[b"1"]);
            wire[0] = flag;
            let err = Deframer::new(4).feed(&wire.into(), |_| Ok(())).err();
            assert_eq!(
                err.map(|s| s.code()),
                Some(tonic::Code::Internal),
                "flag {flag}"
            );
        }
    }

    #[test]
    fn an_error_from_the_reader_stops_the_frame() {
        let wire = Bytes::from(framed(&[b"a", b"b", b"c"]));
        let mut seen = 0;
        let err = Deframer::new(4)
            .feed(&wire, |m| {
                seen += 1;
                if m == b"b"[..] {
                    Err(tonic::Status::internal("bad message"))
                } else {
                    Ok(())
                }
            })
            .err();
        assert_eq!(
            err.map(|s| s.message().to_string()).as_deref(),
            Some("bad message")
        );
        assert_eq!(seen, 2);
    }
}
