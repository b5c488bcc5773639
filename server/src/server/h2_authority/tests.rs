//! The adapter is driven synchronously (no runtime) over a reader that hands out its input in
//! chosen chunk sizes, optionally returning `Pending` between chunks, into caller buffers of
//! chosen sizes. In rewrite mode (first `:authority` a URL), output header blocks are checked by
//! decoding each with a *fresh* HPACK decoder and by parsing their field representations: both
//! hold only if hyper's dynamic table is never needed. In passthrough mode (first `:authority`
//! fine), the output must be the input byte for byte.

use std::task::Waker;

use loona_hpack::Decoder;
use proptest::prelude::*;

use super::*;

// ---- input construction ----------------------------------------------------------------

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    put_frame_head(&mut out, payload.len(), kind, flags, stream_id);
    out.extend_from_slice(payload);
    out.to_vec()
}

fn settings() -> Vec<u8> {
    // SETTINGS_ENABLE_PUSH = 0, SETTINGS_INITIAL_WINDOW_SIZE = 1 MiB
    frame(0x4, 0, 0, &[0, 2, 0, 0, 0, 0, 0, 4, 0, 0x10, 0, 0])
}

fn window_update() -> Vec<u8> {
    frame(0x8, 0, 0, &[0, 0x0f, 0, 1])
}

fn data(stream_id: u32, end_stream: bool, payload: &[u8]) -> Vec<u8> {
    frame(0x0, u8::from(end_stream), stream_id, payload)
}

fn headers(stream_id: u32, flags: u8, block: &[u8]) -> Vec<u8> {
    frame(TYPE_HEADERS, flags, stream_id, block)
}

fn hex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vector")
}

const GRPC_REQUEST: &[(&str, &str)] = &[
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/etcdserverpb.Maintenance/Status"),
    (":authority", "http://127.0.0.1:2379"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-go/1.26.0"),
    ("te", "trailers"),
];

/// [`GRPC_REQUEST`] encoded twice in a row by Python's `hpack` 4.2.0 encoder with Huffman
/// coding, as grpc-go does: `Encoder().encode(headers, huffman=True)`. The first block adds
/// `:authority` to the dynamic table (`41 8f ...`: incremental indexing, Huffman value); the
/// second consists of indexed fields only (`c1` is that entry).
const HUFFMAN_BLOCK_1: &str = "8386449760a924882d9dcb6571afa066a925a87510ac6e48d36a3f418f9d29aee30c044eae05c0b86e09975f5f8b1d75d0620d263d4c4d65647a8a9acac8b4c7602b89c5c14082497f864d833505b11f";
const HUFFMAN_BLOCK_2: &str = "8386c2c1c0bfbe";

/// Five gRPC calls on one connection, encoded by Python's `hpack` 4.2.0 encoder with Huffman
/// coding, the way grpc-go's encoder works (every field indexed, later blocks by reference):
/// `e = Encoder(); [e.encode(h, huffman=True) for h in recorded_requests(authority)]`.
/// `grpc-timeout` changes on every call and so is a new literal each time (`7e`, `7f 00`: name
/// from the dynamic table); block 3 and 4 add new `:path` values, block 5 references them.
const RECORDED_GOOD: [&str; 5] = [
    "8386449060a924882d9dcb6571af9b8b1b4754c5418a089d5c0b8170dc132ebf5f8b1d75d0620d263d4c4d65647a8a9acac8b4c7602bb6fae04082497f864d833505b11f40899acac8b24d494f6a7f8469f7dfa7",
    "8386c3c2c1c0bf7e8469f7dea7",
    "8386448f60a924882d9dcb6571af9b8b1aed4fc4c3c2c17f008469f7dda7",
    "8386449560a924882d9dcb6571af9ca34158ce51a0b8ac1d49c6c5c4c37f008469f7dca7",
    "8386c8c7c6c5c47e8469f7dba7",
];
/// The same calls with `:authority: http://127.0.0.1:2379`, as etcdctl 3.4 sends it.
const RECORDED_BAD: [&str; 5] = [
    "8386449060a924882d9dcb6571af9b8b1b4754c5418f9d29aee30c044eae05c0b86e09975f5f8b1d75d0620d263d4c4d65647a8a9acac8b4c7602bb6fae04082497f864d833505b11f40899acac8b24d494f6a7f8469f7dfa7",
    "8386c3c2c1c0bf7e8469f7dea7",
    "8386448f60a924882d9dcb6571af9b8b1aed4fc4c3c2c17f008469f7dda7",
    "8386449560a924882d9dcb6571af9ca34158ce51a0b8ac1d49c6c5c4c37f008469f7dca7",
    "8386c8c7c6c5c47e8469f7dba7",
];

/// The header lists behind [`RECORDED_GOOD`] and [`RECORDED_BAD`].
fn recorded_requests(authority: &str) -> Vec<Vec<(String, String)>> {
    let paths = [
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.Lease/LeaseGrant",
        "/etcdserverpb.KV/Range",
    ];
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let timeout = format!("{}m", 4999 - i);
            strs(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", authority),
                ("content-type", "application/grpc"),
                ("user-agent", "grpc-go/1.59.0"),
                ("te", "trailers"),
                ("grpc-timeout", &timeout),
            ])
        })
        .collect()
}

/// A connection carrying `blocks` as requests on streams 1, 3, ..., each with a DATA frame,
/// and SETTINGS, WINDOW_UPDATE and PING frames before and between them. The first block is
/// split over HEADERS (padded, with priority) + an empty CONTINUATION + a CONTINUATION.
fn recorded_connection(blocks: &[&str]) -> Vec<u8> {
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    input.extend(window_update());
    for (i, block) in blocks.iter().enumerate() {
        let block = hex(block);
        let stream_id = 2 * i as u32 + 1;
        if i == 0 {
            let mut payload = vec![3]; // pad length
            payload.extend([0, 0, 0, 0, 15]); // priority
            payload.extend(&block[..10]);
            payload.extend([0; 3]);
            input.extend(headers(stream_id, FLAG_PADDED | FLAG_PRIORITY, &payload));
            input.extend(frame(TYPE_CONTINUATION, 0, stream_id, &[]));
            input.extend(frame(
                TYPE_CONTINUATION,
                FLAG_END_HEADERS,
                stream_id,
                &block[10..],
            ));
        } else {
            input.extend(headers(stream_id, FLAG_END_HEADERS, &block));
        }
        input.extend(frame(0x6, 0, 0, b"pingpong"));
        input.extend(data(stream_id, true, &[0, 0, 0, 0, 2, 8, 1]));
    }
    input
}

/// The header lists of the requests in `out`, decoded as hyper does: one decoder for the whole
/// connection, so references to its dynamic table resolve to what it added.
fn decode_as_hyper(out: &[u8]) -> Vec<Vec<(String, String)>> {
    let mut decoder = Decoder::new();
    let mut lists = Vec::new();
    let mut fragment = Vec::new();
    for f in frames(&out[PREFACE.len()..]) {
        let mut payload = &f.payload[..];
        match f.kind {
            TYPE_HEADERS => {
                let mut pad = 0;
                if f.flags & FLAG_PADDED != 0 {
                    pad = usize::from(payload[0]);
                    payload = &payload[1..];
                }
                if f.flags & FLAG_PRIORITY != 0 {
                    payload = &payload[PRIORITY_LEN..];
                }
                fragment = payload[..payload.len() - pad].to_vec();
            }
            TYPE_CONTINUATION => fragment.extend_from_slice(payload),
            _ => continue,
        }
        if f.flags & FLAG_END_HEADERS != 0 {
            let list = decoder.decode(&fragment).expect("hyper decodes the block");
            lists.push(
                list.into_iter()
                    .map(|(n, v)| {
                        (
                            String::from_utf8(n).expect("utf-8"),
                            String::from_utf8(v).expect("utf-8"),
                        )
                    })
                    .collect(),
            );
        }
    }
    lists
}

fn fixed(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            let v = if *n == ":authority" {
                v.trim_start_matches("http://").trim_end_matches('/')
            } else {
                v
            };
            (n.to_string(), v.to_string())
        })
        .collect()
}

/// A gRPC-like connection: two calls whose header blocks are Huffman coded, the second one
/// all dynamic-table references, with DATA, PING and WINDOW_UPDATE around them.
fn grpc_connection() -> Vec<u8> {
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    input.extend(window_update());
    input.extend(headers(1, FLAG_END_HEADERS, &hex(HUFFMAN_BLOCK_1)));
    input.extend(data(1, true, &[0, 0, 0, 0, 2, 8, 1]));
    input.extend(frame(0x6, 0, 0, b"pingpong"));
    input.extend(headers(3, FLAG_END_HEADERS, &hex(HUFFMAN_BLOCK_2)));
    input.extend(data(3, false, &[7; 300]));
    input.extend(data(3, true, &[]));
    input
}

// ---- driving the adapter -----------------------------------------------------------------

/// Hands out `data` in chunks of the given sizes (cycled), and `Pending` before every other
/// chunk when `pending` is set.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    next: usize,
    pending: bool,
    was_pending: bool,
}

impl AsyncRead for Chunked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending && !this.was_pending {
            this.was_pending = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.was_pending = false;
        let size = this.sizes[this.next % this.sizes.len()].max(1);
        this.next += 1;
        let n = size.min(buf.remaining()).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

struct Run {
    out: Vec<u8>,
    error: Option<io::Error>,
    /// Whether the adapter ended in pure passthrough (its rewriter dropped).
    passthrough: bool,
}

/// Reads the adapter to its end: input in `read_sizes` chunks, into caller buffers of
/// `buf_sizes` bytes, each buffer already holding a few bytes when `prefilled` is set.
fn run_with(
    input: &[u8],
    read_sizes: &[usize],
    buf_sizes: &[usize],
    pending: bool,
    prefilled: bool,
) -> Run {
    let mut stream = H2AuthorityStream::new(Chunked {
        data: input.to_vec(),
        pos: 0,
        sizes: read_sizes.to_vec(),
        next: 0,
        pending,
        was_pending: false,
    });
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    for i in 0..64 * (input.len() + 1024) {
        let size = buf_sizes[i % buf_sizes.len()].max(1);
        let mut space = vec![0u8; size + 3];
        let mut buf = ReadBuf::new(&mut space);
        if prefilled {
            buf.put_slice(b"xyz");
        }
        match Pin::new(&mut stream).poll_read(&mut cx, &mut buf) {
            Poll::Pending => {}
            Poll::Ready(Err(e)) => {
                return Run {
                    out,
                    error: Some(e),
                    passthrough: matches!(stream.mode, Mode::Passthrough),
                }
            }
            Poll::Ready(Ok(())) => {
                let skip = if prefilled { 3 } else { 0 };
                assert_eq!(&buf.filled()[..skip], &b"xyz"[..skip], "bytes before ours");
                let new = &buf.filled()[skip..];
                if new.is_empty() {
                    return Run {
                        out,
                        error: None,
                        passthrough: matches!(stream.mode, Mode::Passthrough),
                    };
                }
                out.extend_from_slice(new);
            }
        }
    }
    panic!("the adapter did not reach the end of the stream");
}

fn run(input: &[u8]) -> Vec<u8> {
    let r = run_with(input, &[usize::MAX], &[64 * 1024], false, false);
    if let Some(e) = r.error {
        panic!("unexpected error: {e}");
    }
    r.out
}

// ---- checking the output -----------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Frame {
    kind: u8,
    flags: u8,
    stream_id: u32,
    payload: Vec<u8>,
}

fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let head = FrameHead::parse(bytes).expect("whole frame header");
        let payload = bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + head.len].to_vec();
        out.push(Frame {
            kind: head.kind,
            flags: head.flags,
            stream_id: head.stream_id,
            payload,
        });
        bytes = &bytes[FRAME_HEADER_LEN + head.len..];
    }
    out
}

/// A request as hyper sees it: HEADERS (+ CONTINUATION) joined into one block.
#[derive(Debug)]
struct Block {
    stream_id: u32,
    flags: u8,
    priority: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
}

/// Splits the adapter's output into the preface, the frames that are not header frames, and
/// the header blocks; checks the frame sizes and flags hyper relies on.
fn split_output(out: &[u8]) -> (Vec<Frame>, Vec<Block>) {
    assert!(out.starts_with(PREFACE), "preface forwarded");
    let mut others = Vec::new();
    let mut blocks = Vec::new();
    let mut open: Option<(Block, Vec<u8>)> = None;
    for f in frames(&out[PREFACE.len()..]) {
        assert!(f.payload.len() <= MAX_OUT_FRAME_PAYLOAD, "frame too large");
        match f.kind {
            TYPE_HEADERS => {
                assert!(open.is_none(), "HEADERS inside a block");
                assert_eq!(f.flags & FLAG_PADDED, 0, "padding is dropped");
                let (priority, fragment) = if f.flags & FLAG_PRIORITY != 0 {
                    (Some(f.payload[..5].to_vec()), f.payload[5..].to_vec())
                } else {
                    (None, f.payload.clone())
                };
                let block = Block {
                    stream_id: f.stream_id,
                    flags: f.flags,
                    priority,
                    headers: Vec::new(),
                };
                open = Some((block, fragment));
            }
            TYPE_CONTINUATION => {
                let (block, fragment) = open.as_mut().expect("CONTINUATION after HEADERS");
                assert_eq!(block.stream_id, f.stream_id);
                assert_eq!(f.flags & !FLAG_END_HEADERS, 0);
                fragment.extend_from_slice(&f.payload);
            }
            _ => {
                assert!(open.is_none(), "frame inside a block");
                others.push(f);
                continue;
            }
        }
        if f.flags & FLAG_END_HEADERS != 0 {
            let (mut block, fragment) = open.take().expect("open block");
            assert_literal_fields(&fragment);
            block.headers = Decoder::new()
                .decode(&fragment)
                .expect("decodes with an empty table")
                .into_iter()
                .map(|(n, v)| {
                    (
                        String::from_utf8(n).expect("utf-8"),
                        String::from_utf8(v).expect("utf-8"),
                    )
                })
                .collect();
            blocks.push(block);
        }
    }
    assert!(open.is_none(), "unterminated header block");
    (others, blocks)
}

/// Every field is a literal without indexing with raw strings: the decoder's table stays empty.
fn assert_literal_fields(mut block: &[u8]) {
    fn int(b: &mut &[u8], prefix: u32) -> usize {
        let max = (1usize << prefix) - 1;
        let mut v = usize::from(b[0]) & max;
        *b = &b[1..];
        if v == max {
            let mut shift = 0;
            loop {
                let byte = b[0];
                *b = &b[1..];
                v += usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    }
    fn string(b: &mut &[u8]) {
        assert_eq!(b[0] & 0x80, 0, "raw string");
        let len = int(b, 7);
        *b = &b[len..];
    }
    while !block.is_empty() {
        assert_eq!(block[0] & 0xf0, 0, "literal without indexing");
        if int(&mut block, 4) == 0 {
            string(&mut block);
        }
        string(&mut block);
    }
}

fn strs(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

// ---- the tests ---------------------------------------------------------------------------

#[test]
fn fix_authority_drops_scheme_and_path() {
    let cases: &[(&str, Option<&str>)] = &[
        ("http://127.0.0.1:2379", Some("127.0.0.1:2379")),
        ("https://etcd.example:2379/", Some("etcd.example:2379")),
        ("unixs://localhost:1234", Some("localhost:1234")),
        ("http://[::1]:2379/v3", Some("[::1]:2379")),
        ("127.0.0.1:2379/", Some("127.0.0.1:2379")),
        ("unix:///tmp/etcd.sock", Some("")),
        ("127.0.0.1:2379", None),
        ("etcd.example", None),
        ("user@host:1", None),
        ("", None),
    ];
    for (value, want) in cases {
        let got = fix_authority(value.as_bytes());
        assert_eq!(got, want.map(str::as_bytes), "{value}");
    }
}

#[test]
fn encode_integer_matches_rfc7541_examples() {
    let mut out = Vec::new();
    encode_integer(&mut out, 0, 5, 10); // C.1.1
    assert_eq!(out, [10]);
    out.clear();
    encode_integer(&mut out, 0, 5, 1337); // C.1.2
    assert_eq!(out, [31, 154, 10]);
    out.clear();
    encode_integer(&mut out, 0, 4, 15);
    assert_eq!(out, [15, 0]);
}

#[test]
fn static_name_index_matches_the_static_table() {
    let mut first = std::collections::HashMap::new();
    for index in 1..=61u8 {
        let entry = Decoder::new()
            .decode(&[0x80 | index])
            .expect("static entry");
        let (name, _) = entry.into_iter().next().expect("one field");
        first.entry(name).or_insert(usize::from(index));
    }
    for (name, index) in &first {
        assert_eq!(static_name_index(name), Some(*index), "{name:?}");
    }
    assert_eq!(static_name_index(b"te"), None);
    assert_eq!(static_name_index(b"grpc-timeout"), None);
}

#[test]
fn encoded_fields_decode_back() {
    let long = "v".repeat(300);
    let fields = [
        (":authority", "127.0.0.1:2379"),
        ("te", "trailers"),
        ("x-long", long.as_str()),
        ("www-authenticate", ""),
    ];
    let mut block = Vec::new();
    for (n, v) in fields {
        encode_field(&mut block, n.as_bytes(), v.as_bytes());
    }
    assert_literal_fields(&block);
    let decoded = Decoder::new().decode(&block).expect("decodes");
    let want: Vec<_> = fields
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    assert_eq!(decoded, want);
}

#[test]
fn rewrites_huffman_authority_and_its_dynamic_table_reference() {
    let input = grpc_connection();
    let out = run(&input);
    let (others, blocks) = split_output(&out);

    assert_eq!(blocks.len(), 2);
    for (block, stream_id) in blocks.iter().zip([1, 3]) {
        assert_eq!(block.stream_id, stream_id);
        assert_eq!(block.flags, FLAG_END_HEADERS);
        assert_eq!(block.headers, fixed(GRPC_REQUEST));
    }
    // Everything else is forwarded byte for byte.
    let mut want = settings();
    want.extend(window_update());
    want.extend(data(1, true, &[0, 0, 0, 0, 2, 8, 1]));
    want.extend(frame(0x6, 0, 0, b"pingpong"));
    want.extend(data(3, false, &[7; 300]));
    want.extend(data(3, true, &[]));
    assert_eq!(others, frames(&want));
}

#[test]
fn one_byte_at_a_time_gives_the_same_bytes() {
    let input = grpc_connection();
    let whole = run(&input);
    for (pending, prefilled) in [(false, false), (true, false), (false, true), (true, true)] {
        let r = run_with(&input, &[1], &[1], pending, prefilled);
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.out, whole, "pending={pending} prefilled={prefilled}");
        let r = run_with(&input, &[1], &[4096], pending, prefilled);
        assert_eq!(r.out, whole, "pending={pending} prefilled={prefilled}");
        let r = run_with(&input, &[4096], &[1], pending, prefilled);
        assert_eq!(r.out, whole, "pending={pending} prefilled={prefilled}");
    }
}

/// A literal with incremental indexing (RFC 7541 §6.2.1), raw strings: the name by static index
/// when `name_index` is non-zero.
fn indexed_literal(out: &mut Vec<u8>, name_index: usize, name: &str, value: &str) {
    encode_integer(out, 0x40, 6, name_index);
    if name_index == 0 {
        encode_string(out, name.as_bytes());
    }
    encode_string(out, value.as_bytes());
}

#[test]
fn dynamic_table_references_across_requests() {
    // Four requests whose `:authority` is a literal, then references to it, then (after a size
    // update evicts it) a literal again, then a reference to the new entry.
    let mut b1 = vec![0x83, 0x86];
    indexed_literal(&mut b1, 4, "", "/etcdserverpb.KV/Put");
    indexed_literal(&mut b1, 1, "", "http://127.0.0.1:2379/"); // table: [authority, path]
    let mut b2 = vec![0x83, 0x86];
    indexed_literal(&mut b2, 0, "x-request-id", "1"); // [x-request-id, authority, path]
    b2.extend([0xbf, 0xc0]); // 63 = authority, 64 = path
                             // Size update to 100 keeps only x-request-id (45); the new authority (64) then evicts it.
    let mut b3 = vec![0x3f, 0x45, 0x83, 0x86, 0xbe];
    indexed_literal(&mut b3, 1, "", "https://etcd-0.etcd:2379");
    b3.push(0x84);
    let b4 = vec![0x83, 0x86, 0x84, 0xbe];
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    for (i, block) in [b1, b2, b3, b4].iter().enumerate() {
        let stream_id = 2 * i as u32 + 1;
        input.extend(headers(stream_id, FLAG_END_HEADERS, block));
        input.extend(data(stream_id, true, b"\0\0\0\0\0"));
    }
    let out = run(&input);
    let (_, blocks) = split_output(&out);
    let post = [(":method", "POST"), (":scheme", "http")];
    let put = (":path", "/etcdserverpb.KV/Put");
    let want = [
        [&post[..], &[put, (":authority", "127.0.0.1:2379")]].concat(),
        [
            &post[..],
            &[("x-request-id", "1"), (":authority", "127.0.0.1:2379"), put],
        ]
        .concat(),
        [
            &post[..],
            &[
                ("x-request-id", "1"),
                (":authority", "etcd-0.etcd:2379"),
                (":path", "/"),
            ],
        ]
        .concat(),
        [
            &post[..],
            &[(":path", "/"), (":authority", "etcd-0.etcd:2379")],
        ]
        .concat(),
    ];
    assert_eq!(blocks.len(), want.len());
    for (block, want) in blocks.iter().zip(&want) {
        assert_eq!(block.headers, strs(want));
    }
    assert_eq!(run_with(&input, &[1], &[2], true, true).out, out);
}

#[test]
fn dynamic_table_size_update_is_consumed() {
    let mut block = vec![0x3f, 0xe1, 0x1f]; // size update to 4096 (the maximum): 001 + 4096
    block.extend(hex(HUFFMAN_BLOCK_1));
    let mut zero = vec![0x20]; // size update to 0: empties the client's table
    zero.extend(hex("8386")); // static entries 3 and 6: :method POST, :scheme http
    let mut input = PREFACE.to_vec();
    input.extend(headers(1, FLAG_END_HEADERS | FLAG_END_STREAM, &block));
    input.extend(headers(3, FLAG_END_HEADERS | FLAG_END_STREAM, &zero));
    let (_, blocks) = split_output(&run(&input));
    assert_eq!(blocks[0].headers, fixed(GRPC_REQUEST));
    assert_eq!(blocks[0].flags, FLAG_END_HEADERS | FLAG_END_STREAM);
    assert_eq!(
        blocks[1].headers,
        strs(&[(":method", "POST"), (":scheme", "http")])
    );

    // Over the server's SETTINGS_HEADER_TABLE_SIZE: a protocol error.
    let mut input = PREFACE.to_vec();
    input.extend(headers(1, FLAG_END_HEADERS, &[0x3f, 0xe2, 0x1f, 0x82]));
    let r = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
    assert!(r.error.is_some());
}

#[test]
fn continuation_frames_are_joined() {
    let block = hex(HUFFMAN_BLOCK_1);
    let mut input = PREFACE.to_vec();
    input.extend(headers(5, FLAG_END_STREAM, &block[..1]));
    input.extend(frame(TYPE_CONTINUATION, 0, 5, &block[1..30]));
    input.extend(frame(TYPE_CONTINUATION, 0, 5, &[]));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, &block[30..]));
    input.extend(data(7, false, b"after"));
    let out = run(&input);
    let (others, blocks) = split_output(&out);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].stream_id, 5);
    assert_eq!(blocks[0].flags, FLAG_END_STREAM | FLAG_END_HEADERS);
    assert_eq!(blocks[0].headers, fixed(GRPC_REQUEST));
    assert_eq!(others, frames(&data(7, false, b"after")));
    assert_eq!(run_with(&input, &[1], &[3], true, true).out, out);
}

#[test]
fn padded_headers_with_priority() {
    let block = hex(HUFFMAN_BLOCK_1);
    let priority = [0x80, 0, 0, 3, 200]; // exclusive, depends on stream 3, weight 201
    let mut payload = vec![7]; // pad length
    payload.extend(priority);
    payload.extend(&block);
    payload.extend([0; 7]);
    let flags = FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS | FLAG_END_STREAM;
    let mut input = PREFACE.to_vec();
    input.extend(headers(9, flags, &payload));
    let (_, blocks) = split_output(&run(&input));
    assert_eq!(
        blocks[0].flags,
        FLAG_PRIORITY | FLAG_END_HEADERS | FLAG_END_STREAM
    );
    assert_eq!(blocks[0].priority.as_deref(), Some(&priority[..]));
    assert_eq!(blocks[0].headers, fixed(GRPC_REQUEST));

    // Padding longer than what is left of the frame: a connection error.
    let mut input = PREFACE.to_vec();
    input.extend(headers(9, FLAG_PADDED | FLAG_END_HEADERS, &[200, 0x82]));
    assert!(run_with(&input, &[usize::MAX], &[1 << 16], false, false)
        .error
        .is_some());
    let mut input = PREFACE.to_vec();
    input.extend(headers(9, FLAG_PRIORITY | FLAG_END_HEADERS, &[0, 0]));
    assert!(run_with(&input, &[usize::MAX], &[1 << 16], false, false)
        .error
        .is_some());
}

#[test]
fn large_blocks_are_resplit_within_the_frame_size() {
    // A 4000-byte value indexed once and referenced 12 times: the references expand to
    // ~48 KB of literals, which must go out as HEADERS + CONTINUATION frames of <= 16 KiB.
    let big = "b".repeat(4000);
    let mut block = vec![0x40];
    encode_string(&mut block, b"x-big");
    encode_string(&mut block, big.as_bytes());
    block.extend([0xbe; 11]); // entry 62: x-big
    block.extend(hex("418f9d29aee30c044eae05c0b86e09975f")); // :authority http://127.0.0.1:2379
    let mut input = PREFACE.to_vec();
    input.extend(headers(
        1,
        FLAG_PRIORITY | FLAG_END_STREAM,
        &[[0, 0, 0, 0, 15].as_slice(), &block[..100]].concat(),
    ));
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block[100..]));
    let out = run(&input);
    let header_frames = frames(&out[PREFACE.len()..]);
    assert_eq!(header_frames.len(), 3);
    assert_eq!(header_frames[0].flags, FLAG_PRIORITY | FLAG_END_STREAM);
    assert_eq!(header_frames[0].payload.len(), MAX_OUT_FRAME_PAYLOAD);
    assert_eq!(
        (header_frames[1].kind, header_frames[1].flags),
        (TYPE_CONTINUATION, 0)
    );
    assert_eq!(header_frames[1].payload.len(), MAX_OUT_FRAME_PAYLOAD);
    assert_eq!(header_frames[2].kind, TYPE_CONTINUATION);
    assert_eq!(header_frames[2].flags, FLAG_END_HEADERS);
    let (_, blocks) = split_output(&out);
    let headers = &blocks[0].headers;
    assert_eq!(headers.len(), 13);
    assert!(headers[..12].iter().all(|(n, v)| n == "x-big" && *v == big));
    assert_eq!(headers[12], (":authority".into(), "127.0.0.1:2379".into()));
    assert_eq!(
        run_with(&input, &[7, 1, 300], &[5000, 1], true, false).out,
        out
    );
}

#[test]
fn oversized_header_lists_close_the_connection() {
    // 17 references to a 4000-byte entry: over MAX_HEADER_LIST_SIZE once decoded.
    let mut block = vec![0x40];
    encode_string(&mut block, b"x-big");
    encode_string(&mut block, "b".repeat(4000).as_bytes());
    block.extend([0xbe; 16]);
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    input.extend(headers(1, FLAG_END_HEADERS, &block));
    let r = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
    assert_eq!(r.error.map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
    assert_eq!(
        r.out,
        [PREFACE, &settings()].concat(),
        "bytes before it are delivered"
    );

    // A header frame longer than we buffer is refused before it is read.
    let mut input = PREFACE.to_vec();
    input.extend(frame(TYPE_HEADERS, 0, 1, &[]));
    input[PREFACE.len()..PREFACE.len() + 3].copy_from_slice(&[0x10, 0, 0]); // 1 MiB
    let r = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
    assert!(r.error.is_some());
}

#[test]
fn protocol_errors_close_the_connection() {
    let block = hex(HUFFMAN_BLOCK_1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "CONTINUATION without HEADERS",
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block),
        ),
        (
            "DATA inside a header block",
            [headers(1, 0, &block[..4]), data(1, true, b"x")].concat(),
        ),
        (
            "CONTINUATION of another stream",
            [
                headers(1, 0, &block[..4]),
                frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &block[4..]),
            ]
            .concat(),
        ),
        (
            "PUSH_PROMISE",
            frame(TYPE_PUSH_PROMISE, FLAG_END_HEADERS, 1, &[0, 0, 0, 2, 0x82]),
        ),
        (
            "index out of the tables",
            headers(1, FLAG_END_HEADERS, &[0xff, 0x00]),
        ),
        (
            "truncated integer",
            headers(1, FLAG_END_HEADERS, &[0x82, 0x7f]),
        ),
        (
            "bad Huffman padding",
            headers(1, FLAG_END_HEADERS, &[0x41, 0x81, 0x00]),
        ),
    ];
    for (name, frames_in) in cases {
        let mut input = PREFACE.to_vec();
        input.extend(settings());
        input.extend(frames_in);
        input.extend(data(1, false, b"never"));
        for sizes in [&[usize::MAX][..], &[1], &[3, 10]] {
            let r = run_with(&input, sizes, &[1 << 16], true, false);
            let e = r.error.unwrap_or_else(|| panic!("{name}: accepted"));
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{name}");
            assert_eq!(r.out, [PREFACE, &settings()].concat(), "{name}");
        }
    }
}

#[test]
fn end_of_stream_inside_a_frame() {
    let block = hex(HUFFMAN_BLOCK_1);
    let full = [PREFACE, &settings(), &headers(1, FLAG_END_HEADERS, &block)].concat();
    for cut in PREFACE.len()..full.len() {
        for sizes in [&[usize::MAX][..], &[1]] {
            let r = run_with(&full[..cut], sizes, &[1 << 16], true, false);
            assert!(r.error.is_none(), "cut at {cut}");
            assert!(full.starts_with(&r.out), "cut at {cut}");
        }
    }
}

#[test]
fn http1_passes_through_untouched() {
    let request = b"POST /v3/kv/range HTTP/1.1\r\nhost: 127.0.0.1:2379\r\ncontent-length: 13\r\n\r\n{\"key\":\"YQ==\"}";
    let almost_h2 = b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\nwhatever follows";
    for input in [&request[..], &almost_h2[..], b"PRI * HT", b"", b"P"] {
        for sizes in [&[usize::MAX][..], &[1], &[2, 5]] {
            for buf in [&[1 << 16][..], &[1]] {
                let r = run_with(input, sizes, buf, true, true);
                assert!(r.error.is_none());
                assert_eq!(r.out, input);
            }
        }
    }
}

#[test]
fn a_bare_preface_is_forwarded() {
    assert_eq!(run(PREFACE), PREFACE);
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    assert_eq!(run_with(&input, &[1], &[1], true, false).out, input);
}

#[test]
fn authority_without_scheme_passes_through() {
    // RFC 7541 C.4.1 to C.4.3: three requests to www.example.com, by reference after the first.
    let mut input = PREFACE.to_vec();
    input.extend(headers(
        1,
        FLAG_END_HEADERS,
        &hex("828684418cf1e3c2e5f23a6ba0ab90f4ff"),
    ));
    input.extend(headers(
        3,
        FLAG_END_HEADERS,
        &hex("828684be5886a8eb10649cbf"),
    ));
    input.extend(headers(
        5,
        FLAG_END_HEADERS,
        &hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
    ));
    let r = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
    assert!(r.error.is_none());
    assert_eq!(r.out, input, "forwarded byte for byte");
    assert!(r.passthrough);
    let first = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    let mut second = first.to_vec();
    second.push(("cache-control", "no-cache"));
    let third = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    assert_eq!(
        decode_as_hyper(&r.out),
        [strs(&first), strs(&second), strs(&third)]
    );
}

#[test]
fn good_first_authority_passes_the_connection_through() {
    let input = recorded_connection(&RECORDED_GOOD);
    let r = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
    assert!(r.error.is_none());
    assert_eq!(r.out, input, "forwarded byte for byte");
    assert!(r.passthrough, "the rewriter is dropped");
    // hyper's decoder, fed the client's own encoding, follows the client's dynamic table.
    assert_eq!(decode_as_hyper(&r.out), recorded_requests("127.0.0.1:2379"));
    for (pending, prefilled) in [(false, false), (true, true)] {
        for (reads, bufs) in [(&[1][..], &[1][..]), (&[1], &[4096]), (&[4096], &[1])] {
            let r = run_with(&input, reads, bufs, pending, prefilled);
            assert!(r.error.is_none());
            assert_eq!(
                r.out, input,
                "reads {reads:?} bufs {bufs:?} pending={pending}"
            );
            assert!(r.passthrough);
        }
    }
}

#[test]
fn after_a_good_first_block_nothing_is_examined() {
    // What would be rewritten or refused before the switch reaches hyper as sent: a later URL
    // authority, then frames that are connection errors (hyper's to report now).
    let mut input = recorded_connection(&RECORDED_GOOD[..1]);
    let mut url = vec![0x82];
    encode_field(&mut url, b":authority", b"http://127.0.0.1:2379");
    input.extend(headers(3, FLAG_END_HEADERS, &url));
    input.extend(headers(5, FLAG_END_HEADERS, &[0xff, 0x00])); // index out of the tables
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 7, &[0x82]));
    input.extend(frame(
        TYPE_PUSH_PROMISE,
        FLAG_END_HEADERS,
        1,
        &[0, 0, 0, 2, 0x82],
    ));
    for reads in [&[usize::MAX][..], &[1], &[5, 17]] {
        let r = run_with(&input, reads, &[1 << 16], true, false);
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.out, input);
        assert!(r.passthrough);
    }
}

#[test]
fn first_block_decides_after_other_frames() {
    // A client may send DATA, PING, WINDOW_UPDATE, PRIORITY, ... before its first HEADERS.
    let mut before = settings();
    before.extend(data(1, false, b"early"));
    before.extend(frame(0x6, 0, 0, b"pingpong"));
    before.extend(frame(0x2, 0, 3, &[0, 0, 0, 1, 15])); // PRIORITY
    before.extend(window_update());
    let good = [
        PREFACE,
        &before,
        &recorded_connection(&RECORDED_GOOD)[PREFACE.len()..],
    ]
    .concat();
    for reads in [&[usize::MAX][..], &[1], &[7, 2, 30]] {
        let r = run_with(&good, reads, &[1 << 16], true, false);
        assert_eq!(r.out, good);
        assert!(r.passthrough);
    }

    let bad = [
        PREFACE,
        &before,
        &recorded_connection(&RECORDED_BAD)[PREFACE.len()..],
    ]
    .concat();
    let out = run(&bad);
    assert!(
        out.starts_with(&[PREFACE, &before].concat()),
        "forwarded as read"
    );
    let (_, blocks) = split_output(&out);
    let want = recorded_requests("127.0.0.1:2379");
    assert_eq!(
        blocks.iter().map(|b| &b.headers).collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>()
    );
    let r = run_with(&bad, &[7, 2, 30], &[13], true, true);
    assert_eq!(r.out, out);
    assert!(!r.passthrough);
}

#[test]
fn first_block_without_authority_passes_through() {
    // HTTP/2 lets `host` stand in for `:authority`; and a block may have neither.
    let mut block = vec![0x82, 0x86, 0x84];
    encode_field(&mut block, b"host", b"127.0.0.1:2379");
    let mut input = PREFACE.to_vec();
    input.extend(settings());
    input.extend(headers(1, FLAG_END_HEADERS | FLAG_END_STREAM, &block));
    input.extend(headers(
        3,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        &[0x82, 0x86, 0x84],
    ));
    let r = run_with(&input, &[3], &[5], true, true);
    assert_eq!(r.out, input);
    assert!(r.passthrough);
}

#[test]
fn bad_first_authority_rewrites_the_whole_connection() {
    let input = recorded_connection(&RECORDED_BAD);
    let r = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
    assert!(r.error.is_none());
    assert!(!r.passthrough);
    let (others, blocks) = split_output(&r.out); // every block literal, fresh-decoder decodable
    let want = recorded_requests("127.0.0.1:2379");
    assert_eq!(blocks.len(), want.len());
    for (i, (block, want)) in blocks.iter().zip(&want).enumerate() {
        assert_eq!(block.stream_id, 2 * i as u32 + 1);
        assert_eq!(&block.headers, want, "request {i}");
    }
    // The first block keeps its priority and loses its padding; the others are unchanged.
    assert_eq!(blocks[0].flags, FLAG_PRIORITY | FLAG_END_HEADERS);
    assert_eq!(blocks[0].priority.as_deref(), Some(&[0, 0, 0, 0, 15][..]));
    assert_eq!(others.len(), 2 + 2 * want.len());
    // hyper, decoding the connection as a whole, agrees.
    assert_eq!(decode_as_hyper(&r.out), want);

    // Later blocks are rewritten even where their own authority is fine.
    let mut input = recorded_connection(&RECORDED_BAD[..2]);
    let mut b3 = vec![0x83, 0x86];
    indexed_literal(&mut b3, 1, "", "etcd-0.etcd:2379"); // entry 62 now
    let b4 = vec![0x83, 0x86, 0xbe, 0xc4]; // 62: the new authority; 68: the old one
    input.extend(headers(5, FLAG_END_HEADERS, &b3));
    input.extend(headers(7, FLAG_END_HEADERS, &b4));
    let out = run(&input);
    let (_, blocks) = split_output(&out);
    let post = [(":method", "POST"), (":scheme", "http")];
    assert_eq!(
        blocks[2].headers,
        strs(&[post[0], post[1], (":authority", "etcd-0.etcd:2379")])
    );
    assert_eq!(
        blocks[3].headers,
        strs(&[
            post[0],
            post[1],
            (":authority", "etcd-0.etcd:2379"),
            (":authority", "127.0.0.1:2379")
        ])
    );
    assert_eq!(run_with(&input, &[1], &[2], true, true).out, out);
}

#[test]
fn empty_continuations_of_the_first_block_are_bounded() {
    let mut input = PREFACE.to_vec();
    input.extend(headers(1, 0, &[0x82]));
    let empty = frame(TYPE_CONTINUATION, 0, 1, &[]);
    for _ in 0..MAX_FIRST_BLOCK_FRAMES / FRAME_HEADER_LEN {
        input.extend(&empty);
    }
    input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x86]));
    let r = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
    assert_eq!(r.error.map(|e| e.kind()), Some(io::ErrorKind::InvalidData));
    assert_eq!(r.out, PREFACE);
}

#[test]
fn authority_reduced_to_nothing_is_left_out() {
    let mut block = vec![0x82];
    encode_field(&mut block, b":authority", b"unix:///tmp/etcd.sock");
    let mut input = PREFACE.to_vec();
    input.extend(headers(1, FLAG_END_HEADERS, &block));
    let (_, blocks) = split_output(&run(&input));
    assert_eq!(blocks[0].headers, strs(&[(":method", "GET")]));
}

/// Per-request cost of the adapter, against reading the same bytes without it: one read per
/// request (as hyper reads a busy connection), 20,000 gRPC calls after the recorded first one,
/// each re-sending `grpc-timeout` as a Huffman literal. Run with
/// `cargo nextest run --release -p metastore-server h2_authority --run-ignored only --no-capture`.
#[test]
#[ignore = "measurement"]
fn measure_cost_per_request() {
    use std::time::Instant;

    const CALLS: usize = 20_000;
    // Indexed :method, :scheme, :path, :authority, content-type, user-agent, te (entries 67 to
    // 63 after the first call), then grpc-timeout: name entry 62, Huffman value "4998m", not
    // indexed, so the table and these indices stay put.
    let block = hex("8386c3c2c1c0bf0f2f8469f7dea7");
    let mut call = headers(3, FLAG_END_HEADERS, &block);
    call.extend(data(
        3,
        true,
        &[0, 0, 0, 0, 10, 10, 3, 102, 111, 111, 18, 3, 98, 97, 114],
    ));
    let connection = |first: &str| {
        let mut input = PREFACE.to_vec();
        input.extend(settings());
        input.extend(headers(1, FLAG_END_HEADERS, &hex(first)));
        for _ in 0..CALLS {
            input.extend(&call);
        }
        input
    };
    let reader = |input: &Vec<u8>| Chunked {
        data: input.clone(),
        pos: 0,
        sizes: vec![call.len()],
        next: 0,
        pending: false,
        was_pending: false,
    };
    fn drain(mut r: impl AsyncRead + Unpin, space: &mut [u8]) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        let mut total = 0;
        loop {
            let mut buf = ReadBuf::new(space);
            match Pin::new(&mut r).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return total,
                Poll::Ready(Ok(())) => total += buf.filled().len(),
                other => panic!("{other:?}"),
            }
        }
    }
    // Best of a few runs, in ns per call.
    let time = |f: &dyn Fn() -> usize| {
        (0..7)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_nanos() as f64 / CALLS as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    let good = connection(RECORDED_GOOD[0]);
    let bad = connection(RECORDED_BAD[0]);
    assert_eq!(run(&good), good);
    let (_, blocks) = split_output(&run(&bad));
    assert_eq!(blocks.len(), CALLS + 1);
    assert_eq!(blocks[CALLS].headers[3].1, "127.0.0.1:2379");

    let mut space = vec![0u8; 64 * 1024];
    let bare = time(&|| drain(reader(&good), &mut space.clone()));
    let pass = time(&|| drain(H2AuthorityStream::new(reader(&good)), &mut space.clone()));
    let rewrite = time(&|| drain(H2AuthorityStream::new(reader(&bad)), &mut space.clone()));
    space.clear();
    println!(
        "per call ({} bytes each): bare reader {bare:.0} ns, passthrough {pass:.0} ns \
         (+{:.0} ns), rewrite {rewrite:.0} ns (+{:.0} ns)",
        call.len(),
        pass - bare,
        rewrite - bare,
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_split_gives_the_same_bytes(
        reads in prop::collection::vec(1usize..64, 1..16),
        bufs in prop::collection::vec(1usize..96, 1..16),
        pending in any::<bool>(),
        prefilled in any::<bool>(),
    ) {
        let input = grpc_connection();
        let r = run_with(&input, &reads, &bufs, pending, prefilled);
        prop_assert!(r.error.is_none());
        prop_assert_eq!(r.out, run(&input));
    }

    #[test]
    fn good_first_authority_is_byte_identical_under_any_split(
        reads in prop::collection::vec(1usize..64, 1..16),
        bufs in prop::collection::vec(1usize..96, 1..16),
        pending in any::<bool>(),
        prefilled in any::<bool>(),
    ) {
        let input = recorded_connection(&RECORDED_GOOD);
        let r = run_with(&input, &reads, &bufs, pending, prefilled);
        prop_assert!(r.error.is_none());
        prop_assert!(r.passthrough);
        prop_assert_eq!(r.out, input);
    }

    #[test]
    fn bad_first_authority_gives_the_same_bytes_under_any_split(
        reads in prop::collection::vec(1usize..64, 1..16),
        bufs in prop::collection::vec(1usize..96, 1..16),
        pending in any::<bool>(),
        prefilled in any::<bool>(),
    ) {
        let input = recorded_connection(&RECORDED_BAD);
        let r = run_with(&input, &reads, &bufs, pending, prefilled);
        prop_assert!(r.error.is_none());
        prop_assert!(!r.passthrough);
        prop_assert_eq!(r.out, run(&input));
    }

    #[test]
    fn arbitrary_frames_never_panic_or_hang(
        tail in prop::collection::vec(any::<u8>(), 0..512),
        reads in prop::collection::vec(1usize..64, 1..8),
    ) {
        let input = [PREFACE, &tail].concat();
        let r = run_with(&input, &reads, &[1 << 16], true, false);
        prop_assert!(r.out.len() <= input.len() + 64 * 1024);
    }

    #[test]
    fn arbitrary_header_blocks_never_panic_or_hang(
        block in prop::collection::vec(any::<u8>(), 0..256),
        flags in any::<u8>(),
    ) {
        let input = [PREFACE, &headers(1, flags | FLAG_END_HEADERS, &block)].concat();
        let _ = run_with(&input, &[usize::MAX], &[1 << 16], false, false);
        let _ = run_with(&input, &[1], &[7], true, false);
    }
}
