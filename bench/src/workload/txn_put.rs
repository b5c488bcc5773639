//! `txn-put`: transactions of `--txn-ops` puts on distinct keys, without compares.

use std::sync::Arc;

use bytes::Bytes;
use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::{
    kv_client::KvClient, request_op, PutRequest, RequestOp, TxnRequest,
};

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::keys::{self, KeySpace, Rng};
use crate::options::Common;
use crate::report::Report;
use crate::runner::{self, Workload};

/// Flags of `txn-put`.
#[derive(Debug, Clone, clap::Args)]
pub struct TxnPutArgs {
    /// Puts per transaction (on consecutive keys of the key space).
    #[arg(long, default_value_t = 1)]
    pub txn_ops: u64,
}

pub struct TxnPut {
    keys: KeySpace,
    value: Bytes,
    ops: u64,
}

impl Workload for TxnPut {
    type Client = (KvClient<Conn>, Rng);

    async fn client(&self, channel: Conn, id: usize) -> Result<Self::Client> {
        Ok(super::kv_client_with_rng(channel, id))
    }

    async fn call(
        &self,
        (kv, rng): &mut Self::Client,
        seq: u64,
    ) -> Result<&'static str, tonic::Status> {
        let base = self.keys.index(seq.wrapping_mul(self.ops), rng);
        let success = (0..self.ops)
            .map(|j| RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: self.keys.key(base + j),
                    value: self.value.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        kv.txn(TxnRequest {
            success,
            ..Default::default()
        })
        .await?;
        Ok("txn-put")
    }
}

pub async fn run(
    common: &Common,
    args: &TxnPutArgs,
    channels: &[Conn],
    bar: &ProgressBar,
) -> Result<Report> {
    let keys = KeySpace::new(
        common.key_size,
        common.key_space_size,
        common.sequential_keys,
    )?;
    if args.txn_ops == 0 || args.txn_ops > keys.len() {
        // A transaction may not put the same key twice.
        return Err(Error::Options(
            "--txn-ops must be between 1 and --key-space-size".into(),
        ));
    }
    let w = Arc::new(TxnPut {
        keys,
        value: keys::value(common.val_size),
        ops: args.txn_ops,
    });
    runner::run("txn-put", common, channels, w, bar).await
}
