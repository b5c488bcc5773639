//! [`RangeBudget`]: the memory large Range results may hold at once
//! (`--max-range-memory-bytes`).
//!
//! Every Range over a key range (and every `RangeStream`) is produced incrementally and holds
//! a bounded *window* of encoded chunks while it is sent; a sorted result (any order but
//! ascending keys) must be held whole, and is charged its estimated size on top. Both are
//! admitted here before any memory is taken: a request that fits waits (in arrival order,
//! bounded by the client's own deadline) until enough of the budget is free; one that could
//! never fit fails at once with ResourceExhausted. So N concurrent lists of any size take at
//! most the budget, plus what each request holds outside it (its request and headers).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::apply::ApplyError;

/// Permits count KiB, so that one acquisition (a `u32` of permits) can cover up to 4 TiB.
const UNIT: u64 = 1024;

/// A share of the budget, returned when dropped.
#[derive(Debug)]
pub struct RangePermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// The memory budget shared by every Range response of this member.
#[derive(Debug, Clone)]
pub struct RangeBudget {
    sem: Arc<Semaphore>,
    total: u64,
}

impl RangeBudget {
    /// A budget of `total` bytes (at least 1 KiB).
    pub fn new(total: u64) -> Self {
        let units = (total / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64 / 2);
        Self {
            sem: Arc::new(Semaphore::new(units as usize)),
            total: units * UNIT,
        }
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes of the budget not held by any response now.
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64 * UNIT
    }

    /// Waits until `bytes` of the budget are free and takes them. Callers must not hold a
    /// permit while they wait (or responses could wait for each other in a cycle).
    ///
    /// Errors: `RangeTooLarge` at once when `bytes` exceed the whole budget (waiting could
    /// never succeed).
    pub async fn admit(&self, bytes: u64) -> Result<RangePermit, ApplyError> {
        if bytes > self.total {
            return Err(ApplyError::RangeTooLarge {
                needed: bytes,
                budget: self.total,
            });
        }
        self.take(bytes).await
    }

    /// Takes a response's streaming window: `bytes`, or the whole budget if it is smaller,
    /// so that a response can always be sent, one at a time at worst.
    pub async fn admit_window(&self, bytes: u64) -> Result<RangePermit, ApplyError> {
        self.take(bytes.min(self.total)).await
    }

    async fn take(&self, bytes: u64) -> Result<RangePermit, ApplyError> {
        // `bytes <= total`, whose units fit a u32 by construction of `new` unless the budget
        // is above 4 TiB; saturate rather than fail then.
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        // The semaphore is never closed: an error cannot happen, but is not a panic either.
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| ApplyError::Mvcc(crate::mvcc::Error::Closed))?;
        Ok(RangePermit(permit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queues_what_fits_and_refuses_what_never_can() {
        let b = RangeBudget::new(10 * UNIT);
        let first = b.admit(6 * UNIT).await.expect("fits");
        assert_eq!(b.available(), 4 * UNIT);
        // A second one of 6 KiB waits until the first is released.
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.admit(6 * UNIT).await.map(|_| ()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.expect("task").expect("admitted");
        // More than the whole budget: refused at once, with both figures in the message.
        let e = b.admit(11 * UNIT).await.expect_err("too large");
        assert!(matches!(e, ApplyError::RangeTooLarge { needed, budget }
            if needed == 11 * UNIT && budget == 10 * UNIT));
        // A window larger than the budget takes all of it instead.
        let w = b.admit_window(100 * UNIT).await.expect("window");
        assert_eq!(b.available(), 0);
        drop(w);
        assert_eq!(b.available(), 10 * UNIT);
    }
}
