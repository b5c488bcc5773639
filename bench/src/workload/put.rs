//! `put`: one `Put` per request, on keys from the key space.

use std::sync::Arc;

use bytes::Bytes;
use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::{kv_client::KvClient, PutRequest};

use crate::conn::Conn;
use crate::error::Result;
use crate::keys::{self, KeySpace, Rng};
use crate::options::Common;
use crate::report::Report;
use crate::runner::{self, Workload};

/// Puts `--val-size` bytes under a key of the key space.
pub struct Put {
    keys: KeySpace,
    value: Bytes,
}

impl Put {
    pub fn new(common: &Common) -> Result<Self> {
        Ok(Self {
            keys: KeySpace::new(
                common.key_size,
                common.key_space_size,
                common.sequential_keys,
            )?,
            value: keys::value(common.val_size),
        })
    }
}

impl Workload for Put {
    type Client = (KvClient<Conn>, Rng);

    async fn client(&self, channel: Conn, id: usize) -> Result<Self::Client> {
        Ok(super::kv_client_with_rng(channel, id))
    }

    async fn call(
        &self,
        (kv, rng): &mut Self::Client,
        seq: u64,
    ) -> Result<&'static str, tonic::Status> {
        let key = self.keys.key(self.keys.index(seq, rng));
        kv.put(PutRequest {
            key,
            value: self.value.clone(),
            ..Default::default()
        })
        .await?;
        Ok("put")
    }
}

pub async fn run(common: &Common, channels: &[Conn], bar: &ProgressBar) -> Result<Report> {
    let w = Arc::new(Put::new(common)?);
    runner::run("put", common, channels, w, bar).await
}
