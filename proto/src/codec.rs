//! The gRPC codec of every generated client and server: prost's encoding, with per-call
//! buffers sized for etcd's messages.
//!
//! tonic's own codec allocates an 8 KiB buffer for each call's request and another for its
//! response. Almost every etcd message is far smaller (a put of a 256-byte value is about
//! 280 bytes), and an 8 KiB block is no longer served from glibc's per-thread cache: each call
//! then takes the arena's slower paths, and a request's zero-copy `Bytes` fields keep its
//! whole block alive until the Raft thread frees it after the apply. A buffer under 1 KiB
//! stays in the cache's size classes; a larger message grows its buffer as before (a decoded
//! message's buffer is reserved whole once its length is read).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec as TonicCodec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The buffer each call starts with, for encoding and for decoding: a round figure under
/// 1,008 bytes, the largest request whose chunk (the request, an 8-byte header, rounded up
/// to 16) glibc's malloc keeps under 1 KiB, in its per-thread cache and small bins.
pub const BUFFER_SIZE: usize = 1000;

/// Bytes of streamed messages gathered into one write (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// The buffer settings of [`Codec`].
pub fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// prost's encoding with [`buffer_settings`]; named by the generated stubs.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}
