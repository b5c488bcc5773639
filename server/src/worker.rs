//! [`ChannelWorker`]: a background thread fed through a channel, stopped and joined on drop;
//! [`Reaper`]: one that runs the clean-up jobs it is handed.

use std::sync::mpsc;
use std::thread::JoinHandle;

/// A named thread that receives `T`s. Dropping it closes the channel (the thread's `recv`
/// fails and it returns after its current item) and waits for the thread, so that what the
/// thread holds, an engine handle above all, is released when its owner is: RocksDB must be
/// closed before the process exits and before its directory is removed or reopened.
pub(crate) struct ChannelWorker<T> {
    name: String,
    tx: Option<mpsc::Sender<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> ChannelWorker<T> {
    /// Starts thread `name` running `run` on the receiving end.
    pub(crate) fn spawn(
        name: &str,
        run: impl FnOnce(mpsc::Receiver<T>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(rx))?;
        Ok(Self {
            name: name.into(),
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands `item` to the thread; `false` when the thread has stopped.
    pub(crate) fn send(&self, item: T) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(item).is_ok())
    }
}

/// A thread for clean-up that must not stall the thread that lets go of something: closing a
/// large deleted file (the kernel then frees its blocks, discards them on a `discard` mount,
/// and drops its cached pages), freeing thousands of buffers. Dropping the reaper waits for
/// the work it was handed.
pub(crate) struct Reaper(ChannelWorker<Box<dyn FnOnce() + Send>>);

impl Reaper {
    /// Starts thread `name`.
    pub(crate) fn spawn(name: &str) -> std::io::Result<Self> {
        ChannelWorker::spawn(name, |rx: mpsc::Receiver<Box<dyn FnOnce() + Send>>| {
            while let Ok(job) = rx.recv() {
                job();
            }
        })
        .map(Self)
    }

    /// Runs `job` on the reaper's thread. If that thread has stopped, `job` is dropped
    /// unrun, which drops what it holds here.
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) {
        self.0.send(Box::new(job));
    }
}

impl<T> Drop for ChannelWorker<T> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(thread = %self.name, "background thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn drop_stops_the_thread_and_releases_what_it_held() {
        let held = Arc::new(());
        let in_thread = held.clone();
        let (seen_tx, seen_rx) = mpsc::channel();
        let w = ChannelWorker::spawn("test-worker", move |rx: mpsc::Receiver<u32>| {
            let _held = in_thread;
            while let Ok(n) = rx.recv() {
                let _ = seen_tx.send(n);
            }
        })
        .expect("spawn");
        assert!(w.send(7));
        assert_eq!(seen_rx.recv().expect("item"), 7);
        drop(w);
        // Joined: the thread's clone is gone by the time drop returns.
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[test]
    fn the_reaper_runs_on_its_own_thread_and_is_done_when_dropped() {
        struct Noted(mpsc::Sender<Option<String>>);
        impl Drop for Noted {
            fn drop(&mut self) {
                let _ = self
                    .0
                    .send(std::thread::current().name().map(str::to_owned));
            }
        }
        let (tx, rx) = mpsc::channel();
        let reaper = Reaper::spawn("test-reaper").expect("spawn");
        let one = Noted(tx.clone());
        reaper.run(move || drop(one));
        let two = vec![Noted(tx.clone()), Noted(tx.clone())];
        reaper.run(move || drop(two));
        reaper.run(move || {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        drop(reaper);
        // All four were done by the time the reaper was dropped, and on its thread.
        let threads: Vec<Option<String>> = rx.try_iter().collect();
        assert_eq!(threads, vec![Some("test-reaper".to_owned()); 4]);
    }

    #[test]
    fn send_reports_a_stopped_thread() {
        let (stopped_tx, stopped_rx) = mpsc::channel();
        let w = ChannelWorker::spawn("test-worker", move |rx: mpsc::Receiver<u32>| {
            drop(rx);
            let _ = stopped_tx.send(());
        })
        .expect("spawn");
        stopped_rx.recv().expect("the thread dropped its receiver");
        assert!(!w.send(1));
    }
}
