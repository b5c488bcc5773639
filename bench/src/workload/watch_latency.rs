//! `watch-latency`: how long a put takes to reach the watchers.
//!
//! `--streams` watch streams (spread over the connections) each hold `--watchers-per-stream`
//! watchers on the whole key space. Then `--total` puts are sent by `--clients` requesters at
//! `--rate` (give one: unlimited puts measure the queue, not the watch path). Each value starts
//! with the time it was sent (8 bytes, nanoseconds since the run started, same process clock),
//! so every event's latency is its arrival time minus that stamp, with no table of puts.
//! The report has `put` (the put's own latency) and `event` (`total × streams × watchers`
//! events when nothing is lost; events still missing 10 s after the last put count as errors).
//! The report's `elapsed_secs` is the put phase; the `event` rate is counted over the time
//! from the first put to the last event received, so a server that falls behind in delivering
//! events shows a lower event rate (over the put phase alone it would look as fast as the puts).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::{kv_client::KvClient, PutRequest, WatchCreateRequest};
use tokio::task::JoinSet;

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::keys::{KeySpace, Rng};
use crate::lean::WatchResponse;
use crate::options::Common;
use crate::report::{record_in, Recorder, Report};
use crate::runner::{self, Workload};
use crate::shards::Placed;

use super::watch::WatchStream;

/// How long to wait for the last events after the last put.
const DRAIN: Duration = Duration::from_secs(10);

/// Flags of `watch-latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchLatencyArgs {
    /// Number of watch streams.
    #[arg(long, default_value_t = 10)]
    pub streams: usize,
    /// Watchers on each stream.
    #[arg(long, default_value_t = 10)]
    pub watchers_per_stream: usize,
}

/// Puts whose value carries its send time.
struct StampedPut {
    keys: KeySpace,
    base: Instant,
    val_size: usize,
}

impl Workload for StampedPut {
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
        let mut value = BytesMut::with_capacity(self.val_size.max(8));
        value.put_u64(self.base.elapsed().as_nanos() as u64);
        value.resize(self.val_size.max(8), b'v');
        kv.put(PutRequest {
            key,
            value: value.freeze(),
            ..Default::default()
        })
        .await?;
        Ok("put")
    }
}

/// The latency of an event whose value was stamped by [`StampedPut`] (its first 8 bytes, as
/// [`crate::lean::KeyValue`] reads them), received `now` after the base time (read once per
/// response: its events arrived together).
fn event_latency(now: Duration, stamp: Option<u64>) -> Option<Duration> {
    now.checked_sub(Duration::from_nanos(stamp?))
}

pub async fn run(
    common: &Common,
    args: &WatchLatencyArgs,
    channels: &[Conn],
    bar: &ProgressBar,
) -> Result<Report> {
    common.validate()?;
    if args.streams == 0 || args.watchers_per_stream == 0 {
        return Err(Error::Options(
            "--streams and --watchers-per-stream must be at least 1".into(),
        ));
    }
    let keys = KeySpace::new(
        common.key_size,
        common.key_space_size,
        common.sequential_keys,
    )?;
    let watch_all = WatchCreateRequest {
        key: keys.key(0),
        range_end: keys.end(),
        ..Default::default()
    };
    let base = Instant::now();
    let per_stream = common.total * args.watchers_per_stream as u64;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut readers = JoinSet::new();
    let mut set_ups = Vec::with_capacity(args.streams);
    for s in 0..args.streams {
        // Each stream is opened, and then read, on its connection's runtime.
        let ch = channels[s % channels.len()].clone();
        let runtime = ch.runtime();
        let (watch_all, watchers) = (watch_all.clone(), args.watchers_per_stream);
        let (set_up, set_up_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let mut stop = stop_rx.clone();
        let reader = async move {
            let mut rec = Recorder::new();
            let opened = async {
                let mut stream = WatchStream::open(ch, watch_all.clone()).await?;
                for _ in 1..watchers {
                    stream.watch(watch_all.clone()).await?;
                }
                Ok::<_, Error>(stream)
            };
            let mut stream = match opened.await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = set_up.send(Err(e));
                    return (rec, None);
                }
            };
            let _ = set_up.send(Ok(()));
            let mut got = 0u64;
            let mut last_event = None;
            // One response read into again and again: its event vector is allocated once.
            let mut resp = WatchResponse::default();
            while got < per_stream {
                let read = tokio::select! {
                    // The stream first: a response already read is taken without polling
                    // (and registering with) the stop signal.
                    biased;
                    r = stream.next_into(&mut resp) => r,
                    _ = stop.changed() => break,
                };
                match read {
                    Ok(true) => {
                        if resp.events.is_empty() {
                            continue;
                        }
                        let arrived = Instant::now();
                        last_event = Some(arrived);
                        let now = arrived.saturating_duration_since(base);
                        let events = rec.histogram("event");
                        let mut unstamped = 0;
                        for ev in &resp.events {
                            match event_latency(now, ev.kv.as_ref().and_then(|kv| kv.stamp)) {
                                Some(l) => record_in(events, l),
                                None => unstamped += 1,
                            }
                        }
                        got += resp.events.len() as u64;
                        rec.error_n("event without a time stamp", unstamped);
                    }
                    Ok(false) => break,
                    Err(s) => {
                        rec.error(format!("watch stream: {:?}: {}", s.code(), s.message()));
                        break;
                    }
                }
            }
            rec.error_n("event not received", per_stream.saturating_sub(got));
            (rec, last_event)
        };
        readers.spawn_on(reader, &runtime);
        set_ups.push(set_up_rx);
    }
    // Every watcher exists before the first put (dropping `readers` ends the others).
    runner::all_set_up(set_ups, "a watch reader").await?;

    let puts = Arc::new(StampedPut {
        keys,
        base,
        val_size: common.val_size,
    });
    let puts_start = Instant::now();
    let (mut all, put_elapsed) = runner::drive(common, channels, puts, bar).await?;
    let deadline = tokio::time::Instant::now() + DRAIN;
    let mut stopped = false;
    let mut last_event: Option<Instant> = None;
    loop {
        tokio::select! {
            done = readers.join_next() => match done {
                Some(Ok((rec, last))) => {
                    all.merge(rec);
                    last_event = last_event.max(last);
                }
                Some(Err(e)) => all.error(format!("watch reader failed: {e}")),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline), if !stopped => {
                stopped = true;
                let _ = stop_tx.send(true);
            }
        }
    }
    let mut report = all.report("watch-latency", put_elapsed);
    if let (Some(last), Some(events)) = (last_event, report.ops.get_mut("event")) {
        let secs = last.saturating_duration_since(puts_start).as_secs_f64();
        if secs > 0.0 {
            events.per_sec = events.count as f64 / secs;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        use prost::Message;
        // A value as `StampedPut` writes it, read back through the lean key-value.
        let stamp = Duration::from_secs(4).as_nanos() as u64;
        let mut value = stamp.to_be_bytes().to_vec();
        value.extend_from_slice(b"vvvv");
        let full = metastore_proto::mvccpb::KeyValue {
            value: bytes::Bytes::from(value),
            ..Default::default()
        };
        let read = crate::lean::KeyValue::decode(full.encode_to_vec().as_slice())
            .map(|kv| kv.stamp)
            .unwrap_or_default();
        let now = Duration::from_millis(5_250);
        assert_eq!(event_latency(now, read), Some(Duration::from_millis(1_250)));
        assert_eq!(event_latency(Duration::from_secs(3), read), None);
        assert_eq!(event_latency(now, None), None);
    }
}
