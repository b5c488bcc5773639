//! The events a delivery carries, shared by every watcher that gets them and encoded once.
//!
//! A published group of revisions becomes one [`Batch`]: its events, each with its wire
//! encoding (made on first use, with and without `prev_kv`), behind one `Arc`. A watcher's
//! delivery is an [`Events`]: the batch and which of its events the watcher gets. So a
//! thousand watchers of one key cost one reference count per delivery, not a copy of every
//! event, and the connection writes each event's encoded bytes instead of encoding the event
//! again for every watcher. Each encoding is kept as the whole `WatchResponse.events` field
//! (its key and length too), so that a watcher's response takes it with one copy.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use bytes::BufMut;
use metastore_proto::mvccpb::Event;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;

/// One event of a batch, with its encodings made on first use.
#[derive(Debug)]
pub struct SharedEvent {
    event: Event,
    /// The field ([`field`]) without `prev_kv`, when the event has one.
    bare: OnceLock<Vec<u8>>,
    /// The field of the whole event.
    full: OnceLock<Vec<u8>>,
}

/// `event` encoded as one `WatchResponse.events` field: the field's key, the event's length
/// and its `mvccpb.Event` encoding. A watcher's response takes it with one copy, where
/// writing the key and the length for every watcher was ~10 % of the server's instructions
/// at watch-events (docs/PERFORMANCE.md, session 56).
fn field(event: &Event) -> Vec<u8> {
    let len = event.encoded_len();
    let mut bytes = Vec::with_capacity(1 + encoded_len_varint(len as u64) + len);
    encode_key(EVENTS_FIELD, WireType::LengthDelimited, &mut bytes);
    encode_varint(len as u64, &mut bytes);
    event.encode_raw(&mut bytes);
    bytes
}

impl SharedEvent {
    fn new(event: Event) -> Self {
        Self {
            event,
            bare: OnceLock::new(),
            full: OnceLock::new(),
        }
    }

    /// The event as published (its `prev_kv` filled when it was read).
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The event as a `WatchResponse.events` field ([`field`]), with its `prev_kv` or
    /// without.
    fn field_bytes(&self, prev_kv: bool) -> &[u8] {
        if prev_kv || self.event.prev_kv.is_none() {
            self.full.get_or_init(|| field(&self.event))
        } else {
            self.bare.get_or_init(|| field(&self.to_event(false)))
        }
    }

    /// A copy of the event, with its `prev_kv` or without.
    pub fn to_event(&self, prev_kv: bool) -> Event {
        Event {
            r#type: self.event.r#type,
            kv: self.event.kv.clone(),
            prev_kv: if prev_kv {
                self.event.prev_kv.clone()
            } else {
                None
            },
        }
    }
}

/// The events of one published group (or one replay read), in revision order.
pub type Batch = Arc<[SharedEvent]>;

/// Makes a batch of `events`.
pub fn batch(events: Vec<Event>) -> Batch {
    events.into_iter().map(SharedEvent::new).collect()
}

/// Which events of a batch a delivery carries.
#[derive(Debug, Clone)]
enum Pick {
    /// A run of consecutive events (the usual case: a watcher wants all of a group).
    Run(Range<usize>),
    /// Any events, by index, ascending.
    Some(Vec<u32>),
}

/// The events one delivery carries: some events of a shared [`Batch`], with `prev_kv` or not.
#[derive(Debug, Clone)]
pub struct Events {
    batch: Batch,
    pick: Pick,
    prev_kv: bool,
}

/// The tag of `WatchResponse.events` (field 11).
const EVENTS_FIELD: u32 = 11;

impl Events {
    /// The events of `batch` for which `want` holds, with `prev_kv` or not.
    pub fn select(batch: &Batch, prev_kv: bool, mut want: impl FnMut(&Event) -> bool) -> Self {
        let mut run: Option<Range<usize>> = None;
        let mut some: Option<Vec<u32>> = None;
        for (i, e) in batch.iter().enumerate() {
            if !want(&e.event) {
                continue;
            }
            match (&mut some, &mut run) {
                (Some(v), _) => v.push(i as u32),
                (None, None) => run = Some(i..i + 1),
                (None, Some(r)) if r.end == i => r.end = i + 1,
                (None, Some(r)) => {
                    let mut v: Vec<u32> = (r.start as u32..r.end as u32).collect();
                    v.push(i as u32);
                    some = Some(v);
                }
            }
        }
        let pick = match (some, run) {
            (Some(v), _) => Pick::Some(v),
            (None, r) => Pick::Run(r.unwrap_or(0..0)),
        };
        Self {
            batch: batch.clone(),
            pick,
            prev_kv,
        }
    }

    /// Every event of `batch`.
    #[cfg(test)]
    pub(crate) fn all(batch: &Batch, prev_kv: bool) -> Self {
        Self::select(batch, prev_kv, |_| true)
    }

    pub fn len(&self) -> usize {
        match &self.pick {
            Pick::Run(r) => r.len(),
            Pick::Some(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The events, in order.
    pub fn iter(&self) -> impl Iterator<Item = &SharedEvent> + '_ {
        let (run, some) = match &self.pick {
            Pick::Run(r) => (Some(&self.batch[r.clone()]), None),
            Pick::Some(v) => (None, Some(v)),
        };
        let some = some.into_iter().flatten().map(|i| &self.batch[*i as usize]);
        run.into_iter().flatten().chain(some)
    }

    /// The first event.
    pub fn first(&self) -> Option<&SharedEvent> {
        self.iter().next()
    }

    /// Copies of the events as a watcher gets them (`prev_kv` only when it asked).
    pub fn to_vec(&self) -> Vec<Event> {
        self.iter().map(|e| e.to_event(self.prev_kv)).collect()
    }

    /// Bytes of `events` (field 11) in an encoded `WatchResponse`.
    pub fn encoded_len(&self) -> usize {
        self.iter().map(|e| e.field_bytes(self.prev_kv).len()).sum()
    }

    /// Writes the events as `WatchResponse.events` (field 11).
    pub fn encode(&self, buf: &mut impl BufMut) {
        for e in self.iter() {
            buf.put_slice(e.field_bytes(self.prev_kv));
        }
    }

    /// The events cut into runs of at most `max_bytes` encoded (each holding at least one
    /// event), in order: the fragments of a response too large for one message.
    pub fn split(&self, max_bytes: usize) -> Vec<Events> {
        let mut out = Vec::new();
        let mut cur: Vec<u32> = Vec::new();
        let mut size = 0;
        let indices: Vec<u32> = match &self.pick {
            Pick::Run(r) => (r.start as u32..r.end as u32).collect(),
            Pick::Some(v) => v.clone(),
        };
        for i in indices {
            let n = self.batch[i as usize].field_bytes(self.prev_kv).len();
            if !cur.is_empty() && size + n > max_bytes {
                out.push(self.with_pick(Pick::Some(std::mem::take(&mut cur))));
                size = 0;
            }
            size += n;
            cur.push(i);
        }
        if !cur.is_empty() || out.is_empty() {
            out.push(self.with_pick(Pick::Some(cur)));
        }
        out
    }

    fn with_pick(&self, pick: Pick) -> Events {
        Events {
            batch: self.batch.clone(),
            pick,
            prev_kv: self.prev_kv,
        }
    }
}

/// Equal when a watcher gets the same events.
impl PartialEq for Events {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.to_vec() == other.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use metastore_proto::etcdserverpb::WatchResponse;
    use metastore_proto::mvccpb::{event::EventType, KeyValue};

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
            create_revision: 2,
            mod_revision: rev,
            version: rev - 1,
            lease: 0,
        }
    }

    fn events(n: i64) -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                r#type: if i % 3 == 2 {
                    EventType::Delete as i32
                } else {
                    EventType::Put as i32
                },
                kv: Some(kv(&format!("k{i}"), &"v".repeat(i as usize * 40), 10 + i)),
                prev_kv: (i % 2 == 1).then(|| kv(&format!("k{i}"), "old", 9 + i)),
            })
            .collect()
    }

    /// What prost makes of a response carrying these events.
    fn decoded(e: &Events) -> WatchResponse {
        let mut buf = Vec::new();
        e.encode(&mut buf);
        assert_eq!(buf.len(), e.encoded_len());
        WatchResponse::decode(buf.as_slice()).expect("decodes")
    }

    #[test]
    fn encoded_events_are_what_prost_would_write() {
        let all = events(7);
        let b = batch(all.clone());
        for prev_kv in [false, true] {
            let e = Events::all(&b, prev_kv);
            let expect: Vec<Event> = all
                .iter()
                .map(|ev| Event {
                    prev_kv: if prev_kv { ev.prev_kv.clone() } else { None },
                    ..ev.clone()
                })
                .collect();
            assert_eq!(e.to_vec(), expect);
            assert_eq!(decoded(&e).events, expect);
            let whole = WatchResponse {
                events: expect,
                ..Default::default()
            };
            assert_eq!(e.encoded_len(), whole.encoded_len());
        }
    }

    #[test]
    fn a_selection_keeps_order_whether_it_is_one_run_or_not() {
        let b = batch(events(9));
        let revs = |e: &Events| -> Vec<i64> {
            e.iter()
                .map(|s| s.event().kv.as_ref().map_or(0, |kv| kv.mod_revision))
                .collect()
        };
        let run = Events::select(&b, false, |e| {
            e.kv.as_ref().map_or(0, |kv| kv.mod_revision) >= 14
        });
        assert_eq!(revs(&run), vec![14, 15, 16, 17, 18]);
        assert!(matches!(run.pick, Pick::Run(_)));
        let gaps = Events::select(&b, false, |e| e.r#type == EventType::Put as i32);
        assert_eq!(revs(&gaps), vec![10, 11, 13, 14, 16, 17]);
        assert_eq!(
            decoded(&gaps)
                .events
                .iter()
                .map(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision))
                .collect::<Vec<_>>(),
            vec![10, 11, 13, 14, 16, 17]
        );
        let none = Events::select(&b, true, |_| false);
        assert!(none.is_empty());
        assert_eq!(none.first().map(|_| ()), None);
        assert_eq!(none.encoded_len(), 0);
    }

    #[test]
    fn split_cuts_at_the_bound_and_keeps_every_event_once() {
        let b = batch(events(12));
        let e = Events::all(&b, true);
        let whole = e.to_vec();
        for max in [1, 100, 300, 1_000, 100_000] {
            let parts = e.split(max);
            assert!(!parts.is_empty());
            let mut joined = Vec::new();
            for p in &parts {
                assert!(!p.is_empty());
                // Over the bound only when one event alone is.
                assert!(p.encoded_len() <= max || p.len() == 1, "{max}");
                joined.extend(p.to_vec());
            }
            assert_eq!(joined, whole, "{max}");
            if e.encoded_len() <= max {
                assert_eq!(parts.len(), 1);
            }
        }
        let empty = Events::select(&b, false, |_| false).split(10);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].is_empty());
    }
}
