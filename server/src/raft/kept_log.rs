//! How much of the Raft log to keep after a snapshot, counted in requests.
//!
//! etcd keeps its last 5,000 entries after a snapshot for slow followers to catch up from
//! (`--snapshot-catchup-entries`), and an etcd entry is one request. Here an entry carries a
//! whole group of commands (up to 1,024), so openraft's count of entries
//! (`max_in_snapshot_log_to_keep`) keeps up to a thousand times more under load: 1,000,000
//! puts at 256 clients made only ~5,000 entries, and all of them stayed on disk. A
//! [`KeptLog`] follows the commands of the newest entries as they are applied, so that after
//! a snapshot the log can be purged up to where the newest `keep` commands begin.
//! openraft's own count stays in force as the upper bound of what is kept.

use std::collections::VecDeque;
use std::sync::Mutex;

/// The newest applied entries that hold the newest `keep` commands.
#[derive(Debug, Default)]
pub struct KeptLog {
    keep: u64,
    /// Commands applied in all, as far as followed here.
    total: u64,
    /// `(index, total before it)` of the newest entries: the first is the newest one with at
    /// least `keep` commands from it on, once there are that many.
    entries: VecDeque<(u64, u64)>,
}

impl KeptLog {
    /// Keeps the entries of the newest `keep` commands (0: follows nothing).
    pub fn new(keep: u64) -> Self {
        Self {
            keep,
            ..Self::default()
        }
    }

    /// Entry `index` was applied, carrying `commands` commands (an entry without any, such
    /// as a membership change, counts as one, as it is one entry in etcd).
    pub fn applied(&mut self, index: u64, commands: u64) {
        if self.keep == 0 {
            return;
        }
        if self.entries.back().is_some_and(|(last, _)| index <= *last) {
            // A replay from an earlier point (after a snapshot install): start over.
            self.entries.clear();
        }
        self.entries.push_back((index, self.total));
        self.total += commands.max(1);
        while self
            .entries
            .get(1)
            .is_some_and(|(_, before)| self.total - before >= self.keep)
        {
            self.entries.pop_front();
        }
    }

    /// After a snapshot of everything applied up to `snapshot`: the last entry that may be
    /// purged, so that what is left holds the newest `keep` commands applied, and never one
    /// past the snapshot. Applies go on while a snapshot is recorded, so the newest entry
    /// followed may already be past it. `None` while fewer commands were followed, or when
    /// the snapshot is newer than anything followed.
    pub fn purge_upto(&self, snapshot: u64) -> Option<u64> {
        let (last, _) = *self.entries.back()?;
        let (first, before) = *self.entries.front()?;
        (last >= snapshot && self.keep > 0 && self.total - before >= self.keep && first > 0)
            .then(|| (first - 1).min(snapshot))
    }
}

/// Where the log may be purged to after the last snapshot, so that it keeps the newest
/// commands ([`Context::keep_commands`](super::state_machine::Context::keep_commands)); the
/// server's task asks openraft for the purge.
#[derive(Debug, Default)]
pub struct PurgeHint {
    upto: Mutex<Option<u64>>,
    due: tokio::sync::Notify,
}

impl PurgeHint {
    /// A snapshot lets the log go up to `upto`.
    pub(super) fn offer(&self, upto: u64) {
        if let Ok(mut u) = self.upto.lock() {
            *u = Some(u.map_or(upto, |old| old.max(upto)));
            self.due.notify_one();
        }
    }

    /// Waits until a snapshot offers a purge point, and returns the newest one.
    pub async fn next(&self) -> u64 {
        loop {
            if let Some(upto) = self.upto.lock().ok().and_then(|mut u| u.take()) {
                return upto;
            }
            self.due.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_commands_are_kept_however_they_are_grouped() {
        let mut k = KeptLog::new(10);
        k.applied(1, 4);
        k.applied(2, 4);
        assert_eq!(k.purge_upto(2), None, "8 commands of 10");
        k.applied(3, 4);
        // Entries 1..=3 hold 12, entries 2..=3 only 8: only what is before entry 1.
        assert_eq!(k.purge_upto(3), Some(0));
        k.applied(4, 4);
        // Entries 2..=4 hold 12 and 3..=4 only 8: entry 1 may go.
        assert_eq!(k.purge_upto(4), Some(1));
        k.applied(5, 100);
        // Entry 5 alone holds the newest 10.
        assert_eq!(k.purge_upto(5), Some(4));
        assert_eq!(k.entries.len(), 1, "nothing older is followed");
        // An empty entry counts as one.
        for i in 6..=15 {
            k.applied(i, 0);
        }
        assert_eq!(k.purge_upto(15), Some(5));
    }

    #[test]
    fn one_command_per_entry_keeps_as_many_entries_as_commands() {
        let mut k = KeptLog::new(5000);
        for i in 1..=20_000 {
            k.applied(i, 1);
        }
        assert_eq!(k.purge_upto(20_000), Some(15_000));
        assert!(k.entries.len() <= 5001);
    }

    #[test]
    fn a_snapshot_behind_the_newest_entry_purges_no_further_than_itself() {
        let mut k = KeptLog::new(2);
        for i in 1..=5 {
            k.applied(i, 1);
        }
        assert_eq!(k.purge_upto(5), Some(3));
        // Entries 4 and 5 were applied while the snapshot of 3 was recorded: they hold the
        // newest two commands, and the log goes up to the snapshot, not past it.
        assert_eq!(k.purge_upto(4), Some(3));
        assert_eq!(k.purge_upto(3), Some(3));
        assert_eq!(k.purge_upto(2), Some(2));
        assert_eq!(k.purge_upto(6), None, "newer than anything followed");
        assert_eq!(KeptLog::new(0).purge_upto(0), None);
        let mut off = KeptLog::new(0);
        off.applied(1, 1);
        assert_eq!(off.purge_upto(1), None);
    }

    #[test]
    fn a_replay_from_an_earlier_entry_starts_over() {
        let mut k = KeptLog::new(3);
        for i in 10..=20 {
            k.applied(i, 1);
        }
        assert_eq!(k.purge_upto(20), Some(17));
        k.applied(5, 1);
        assert_eq!(k.purge_upto(5), None);
        k.applied(6, 1);
        k.applied(7, 1);
        assert_eq!(k.purge_upto(7), Some(4));
    }

    #[tokio::test]
    async fn a_purge_point_waits_to_be_offered_and_the_newest_wins() -> anyhow::Result<()> {
        let hint = std::sync::Arc::new(PurgeHint::default());
        let soon = std::time::Duration::from_millis(50);
        assert!(
            tokio::time::timeout(soon, hint.next()).await.is_err(),
            "nothing offered yet"
        );
        hint.offer(0);
        assert_eq!(tokio::time::timeout(soon, hint.next()).await?, 0);
        hint.offer(7);
        hint.offer(5);
        assert_eq!(tokio::time::timeout(soon, hint.next()).await?, 7);
        let waiting = tokio::spawn({
            let hint = hint.clone();
            async move { hint.next().await }
        });
        tokio::task::yield_now().await;
        hint.offer(9);
        assert_eq!(tokio::time::timeout(soon, waiting).await??, 9);
        Ok(())
    }
}
