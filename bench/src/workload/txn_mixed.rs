//! `txn-mixed`: transactions holding one range (a read) or one put (a write), mixed at
//! `--rw-ratio` reads per write; reads and writes are reported apart.

use std::sync::Arc;

use bytes::Bytes;
use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::{
    kv_client::KvClient, request_op, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::keys::{self, KeySpace, Rng};
use crate::options::Common;
use crate::report::Report;
use crate::runner::{self, Workload};

use super::Consistency;

/// Flags of `txn-mixed`.
#[derive(Debug, Clone, clap::Args)]
pub struct TxnMixedArgs {
    /// Reads per write (1 = half reads, 4 = 80 % reads).
    #[arg(long, default_value_t = 1.0)]
    pub rw_ratio: f64,
    /// Reads `l` (linearizable) or `s` (serializable).
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Maximum keys a read returns (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
}

pub struct TxnMixed {
    keys: KeySpace,
    value: Bytes,
    read_fraction: f64,
    serializable: bool,
    limit: i64,
}

impl Workload for TxnMixed {
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
        let (kind, op) = if rng.unit() < self.read_fraction {
            let range = RangeRequest {
                key,
                limit: self.limit,
                serializable: self.serializable,
                ..Default::default()
            };
            ("read", request_op::Request::RequestRange(range))
        } else {
            let put = PutRequest {
                key,
                value: self.value.clone(),
                ..Default::default()
            };
            ("write", request_op::Request::RequestPut(put))
        };
        kv.txn(TxnRequest {
            success: vec![RequestOp { request: Some(op) }],
            ..Default::default()
        })
        .await?;
        Ok(kind)
    }
}

pub async fn run(
    common: &Common,
    args: &TxnMixedArgs,
    channels: &[Conn],
    bar: &ProgressBar,
) -> Result<Report> {
    if !(args.rw_ratio >= 0.0 && args.rw_ratio.is_finite()) {
        return Err(Error::Options(
            "--rw-ratio must be a non-negative number".into(),
        ));
    }
    let w = Arc::new(TxnMixed {
        keys: KeySpace::new(
            common.key_size,
            common.key_space_size,
            common.sequential_keys,
        )?,
        value: keys::value(common.val_size),
        read_fraction: args.rw_ratio / (args.rw_ratio + 1.0),
        serializable: args.consistency.serializable(),
        limit: args.limit,
    });
    runner::run("txn-mixed", common, channels, w, bar).await
}
