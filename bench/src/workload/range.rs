//! `range`: the same `Range` request over and over.

use std::sync::Arc;

use bytes::Bytes;
use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::RangeRequest;

use crate::conn::Conn;
use crate::error::Result;
use crate::keys::{self, KeySpace};
use crate::lean;
use crate::options::Common;
use crate::report::Report;
use crate::runner::{self, Workload};

use super::Consistency;

/// Flags of `range`.
#[derive(Debug, Clone, clap::Args)]
pub struct RangeArgs {
    /// Key to read; default: the first key of the key space (what `put` writes first).
    pub key: Option<String>,
    /// End of the range (exclusive); default: the single key.
    pub end: Option<String>,
    /// Read every key with `KEY` as prefix (all keys when there is no `KEY`).
    #[arg(long, conflicts_with = "end")]
    pub prefix: bool,
    /// `l` (linearizable) or `s` (serializable).
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Maximum number of keys returned (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Return only the count of keys.
    #[arg(long)]
    pub count_only: bool,
    /// Return keys without values.
    #[arg(long)]
    pub keys_only: bool,
}

impl RangeArgs {
    /// The request every requester sends.
    pub fn request(&self, common: &Common) -> Result<RangeRequest> {
        let (key, range_end) = match (&self.key, self.prefix) {
            (None, true) => (Bytes::from_static(b"\0"), Bytes::from_static(b"\0")),
            (Some(k), true) => (Bytes::from(k.clone()), keys::prefix_end(k.as_bytes())),
            (key, false) => {
                let key = match key {
                    Some(k) => Bytes::from(k.clone()),
                    None => KeySpace::new(common.key_size, common.key_space_size, true)?.key(0),
                };
                let end = self.end.clone().map(Bytes::from).unwrap_or_default();
                (key, end)
            }
        };
        Ok(RangeRequest {
            key,
            range_end,
            limit: self.limit,
            serializable: self.consistency.serializable(),
            keys_only: self.keys_only,
            count_only: self.count_only,
            ..Default::default()
        })
    }
}

/// Sends one fixed request. Each answer is decoded as a [`lean::RangeSummary`] (its counts,
/// the key-values skipped unread) and its counts checked.
pub struct Range(RangeRequest);

impl Workload for Range {
    type Client = tonic::client::Grpc<Conn>;

    async fn client(&self, channel: Conn, _id: usize) -> Result<Self::Client> {
        Ok(tonic::client::Grpc::new(channel))
    }

    async fn call(
        &self,
        grpc: &mut Self::Client,
        _seq: u64,
    ) -> Result<&'static str, tonic::Status> {
        let summary = lean::range(grpc, self.0.clone()).await?;
        summary
            .check(self.0.count_only)
            .map_err(tonic::Status::data_loss)?;
        Ok("range")
    }
}

pub async fn run(
    common: &Common,
    args: &RangeArgs,
    channels: &[Conn],
    bar: &ProgressBar,
) -> Result<Report> {
    let w = Arc::new(Range(args.request(common)?));
    runner::run("range", common, channels, w, bar).await
}
