//! Member and cluster ids, derived exactly as etcd derives them, so that the same flags give
//! the same ids (and tools that print them line up with etcd).

use sha1::{Digest, Sha1};
use url::Url;

/// A URL as etcd prints it: `scheme://host:port` without a trailing slash.
pub fn url_string(u: &Url) -> String {
    let s = &u[..url::Position::AfterPath];
    s.strip_suffix('/').unwrap_or(s).to_string()
}

/// etcd's `computeMemberId`: sha1 over the sorted peer URLs joined, then the cluster token;
/// the first 8 bytes big endian.
pub fn member_id(peer_urls: &[Url], token: &str) -> u64 {
    let mut urls: Vec<String> = peer_urls.iter().map(url_string).collect();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(token.as_bytes());
    first_u64(&h.finalize())
}

/// The id etcd gives a member added at run time (`MemberAdd`): as [`member_id`], with no
/// cluster token and the time (Unix seconds) appended, so re-adding the same URLs later gets
/// a new id.
pub fn new_member_id(peer_urls: &[String], unix_secs: u64) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(unix_secs.to_string().as_bytes());
    first_u64(&h.finalize())
}

/// etcd's `genID`: sha1 over the sorted member ids, 8 bytes big endian each.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    first_u64(&h.finalize())
}

fn first_u64(d: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_etcd() -> anyhow::Result<()> {
        // `etcd --name default` with default flags reports member 8e9e05c52164694d in
        // cluster cdf818194e3a8c32 (ids etcd users will recognise from its docs and logs).
        let peer = Url::parse("http://localhost:2380")?;
        let m = member_id(&[peer], "etcd-cluster");
        assert_eq!(format!("{m:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[m])), "cdf818194e3a8c32");
        assert_eq!(
            url_string(&Url::parse("http://127.0.0.1:2380")?),
            "http://127.0.0.1:2380"
        );
        Ok(())
    }
}
