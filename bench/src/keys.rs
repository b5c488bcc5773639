//! Keys and values of the requests.
//!
//! A key is the decimal index of the key in the key space, zero-padded to `--key-size` bytes:
//! with `--key-size 8`, key 42 is `00000042`. Keys are therefore readable with `etcdctl`, sort
//! in index order, and a prefix or a range of them is easy to name.

use bytes::Bytes;

use crate::error::{Error, Result};

/// The shape of the keys a run uses.
#[derive(Debug, Clone)]
pub struct KeySpace {
    size: usize,
    space: u64,
    sequential: bool,
}

impl KeySpace {
    /// Keys of `size` bytes over `space` distinct indexes. Fails when `space - 1` has more
    /// decimal digits than `size`.
    pub fn new(size: usize, space: u64, sequential: bool) -> Result<Self> {
        if space == 0 {
            return Err(Error::Options("--key-space-size must be at least 1".into()));
        }
        let digits = (space - 1).to_string().len();
        if digits > size {
            return Err(Error::Options(format!(
                "--key-size {size} is too small for --key-space-size {space} (needs {digits} bytes)"
            )));
        }
        Ok(Self {
            size,
            space,
            sequential,
        })
    }

    /// Number of distinct keys.
    pub fn len(&self) -> u64 {
        self.space
    }

    /// Always false: a key space has at least one key.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The key index request `seq` uses: `seq` modulo the space, or a random index.
    pub fn index(&self, seq: u64, rng: &mut Rng) -> u64 {
        if self.sequential {
            seq % self.space
        } else {
            rng.below(self.space)
        }
    }

    /// The key of index `idx`.
    pub fn key(&self, idx: u64) -> Bytes {
        Bytes::from(format!("{:0width$}", idx % self.space, width = self.size))
    }

    /// The smallest key after every key of the space: the end of a range covering them all.
    pub fn end(&self) -> Bytes {
        let mut last = self.key(self.space - 1).to_vec();
        last.push(0);
        Bytes::from(last)
    }
}

/// A value of `size` bytes.
pub fn value(size: usize) -> Bytes {
    Bytes::from(vec![b'v'; size])
}

/// etcd's prefix range end: the key with its last byte below 0xff incremented and the rest cut;
/// `\0` (everything) when there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(b"\0")
}

/// SplitMix64: small, fast, seedable; good enough to spread keys (not for cryptography).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A seed that differs per requester and per run.
    pub fn seeded(stream: u64) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self(now ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`), by Lemire's multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_zero_padded_to_the_key_size() -> Result<()> {
        let ks = KeySpace::new(8, 1000, true)?;
        assert_eq!(ks.key(42), Bytes::from_static(b"00000042"));
        assert_eq!(ks.key(999).len(), 8);
        assert_eq!(ks.end(), Bytes::from_static(b"00000999\0"));
        Ok(())
    }

    #[test]
    fn key_size_must_hold_the_key_space() {
        assert!(KeySpace::new(3, 1000, false).is_ok());
        assert!(KeySpace::new(3, 1001, false).is_err());
        assert!(KeySpace::new(8, 0, false).is_err());
    }

    #[test]
    fn sequential_keys_cycle_through_the_space() -> Result<()> {
        let ks = KeySpace::new(4, 3, true)?;
        let mut rng = Rng::new(1);
        let idx: Vec<u64> = (0..7).map(|s| ks.index(s, &mut rng)).collect();
        assert_eq!(idx, [0, 1, 2, 0, 1, 2, 0]);
        Ok(())
    }

    #[test]
    fn random_keys_stay_in_the_space_and_cover_it() -> Result<()> {
        let ks = KeySpace::new(4, 10, false)?;
        let mut rng = Rng::new(7);
        let mut seen = [0u32; 10];
        for s in 0..10_000 {
            let i = ks.index(s, &mut rng);
            assert!(i < 10);
            seen[i as usize] += 1;
        }
        // Uniform: each of 10 keys near 1000 hits.
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        Ok(())
    }

    #[test]
    fn unit_is_in_range() {
        let mut rng = Rng::new(3);
        for _ in 0..10_000 {
            let x = rng.unit();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"abc"), Bytes::from_static(b"abd"));
        assert_eq!(prefix_end(b"a\xff"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"\xff\xff"), Bytes::from_static(b"\0"));
        assert_eq!(prefix_end(b""), Bytes::from_static(b"\0"));
    }

    #[test]
    fn values_have_the_value_size() {
        assert_eq!(value(0).len(), 0);
        assert_eq!(value(256).len(), 256);
    }
}
