//! `lease-keepalive`: keep-alive round trips. Each requester grants one lease (TTL 60 s, not
//! measured), opens one keep-alive stream, and then per request sends a keep-alive and waits for
//! its answer. The leases are left to expire.

use std::sync::Arc;

use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::{
    lease_client::LeaseClient, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::options::Common;
use crate::report::Report;
use crate::runner::{self, Workload};

const TTL_SECS: i64 = 60;

pub struct KeepAlive {
    id: i64,
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    rx: tonic::Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    async fn round_trip(&mut self) -> Result<(), tonic::Status> {
        self.tx
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| tonic::Status::cancelled("keep-alive queue closed"))?;
        match self.rx.message().await? {
            Some(r) if r.ttl > 0 => Ok(()),
            Some(r) => Err(tonic::Status::not_found(format!(
                "lease {:x} expired",
                r.id
            ))),
            None => Err(tonic::Status::unavailable("keep-alive stream ended")),
        }
    }
}

pub struct LeaseKeepalive;

impl Workload for LeaseKeepalive {
    type Client = KeepAlive;

    async fn client(&self, channel: Conn, _id: usize) -> Result<Self::Client> {
        let mut lease = LeaseClient::new(channel);
        let id = lease
            .lease_grant(LeaseGrantRequest {
                ttl: TTL_SECS,
                id: 0,
            })
            .await?
            .into_inner()
            .id;
        // Queue the first keep-alive before the call: the server may send no headers before it.
        let (tx, rx) = mpsc::channel(4);
        tx.send(LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| Error::Stream("keep-alive queue closed".into()))?;
        let mut rx = lease
            .lease_keep_alive(ReceiverStream::new(rx))
            .await?
            .into_inner();
        match rx.message().await? {
            Some(r) if r.ttl > 0 => Ok(KeepAlive { id, tx, rx }),
            _ => Err(Error::Stream(format!(
                "first keep-alive of lease {id:x} failed"
            ))),
        }
    }

    async fn call(
        &self,
        client: &mut Self::Client,
        _seq: u64,
    ) -> Result<&'static str, tonic::Status> {
        client.round_trip().await?;
        Ok("keepalive")
    }
}

pub async fn run(common: &Common, channels: &[Conn], bar: &ProgressBar) -> Result<Report> {
    runner::run(
        "lease-keepalive",
        common,
        channels,
        Arc::new(LeaseKeepalive),
        bar,
    )
    .await
}
