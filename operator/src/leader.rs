//! Leader election, so two or more operator replicas can run with one of them acting.
//!
//! The Lease (`coordination.k8s.io/v1`, named [`LEASE_NAME`] in the operator's namespace) is
//! held through `kube-lease-manager`; this module only decides what to do with the controller
//! when leadership changes ([`next_step`], a pure function) and runs that loop
//! ([`run_while_leader`]).
//!
//! Why stop the controller rather than the process on losing the Lease: another replica may
//! take over within one lease duration, so two replicas must never reconcile at once; aborting
//! the controller task drops its in-flight reconcile at the next await, and every reconcile is
//! idempotent (the workflow record lives in status), so the new leader resumes where it stopped.

use std::future::Future;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::task::JoinHandle;
use tracing::info;

/// Name of the Lease the replicas compete for.
pub const LEASE_NAME: &str = "metastore-operator-leader";
/// Seconds a Lease is held without renewal before another replica may take it.
pub const LEASE_DURATION_SECONDS: u64 = 15;
/// Seconds before expiry at which the holder renews.
pub const LEASE_GRACE_SECONDS: u64 = 5;

/// What to do with the controller after a leadership observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Became leader: start the controller.
    Start,
    /// Lost the Lease: stop the controller at once.
    Stop,
    /// Nothing changed.
    Stay,
}

/// The decision for `is_leader` when the controller is `running` (or not).
///
/// | running | leader | step |
/// |---|---|---|
/// | no | yes | Start |
/// | yes | no | Stop |
/// | no | no | Stay (follower waits) |
/// | yes | yes | Stay (renewals) |
pub fn next_step(running: bool, is_leader: bool) -> Step {
    match (running, is_leader) {
        (false, true) => Step::Start,
        (true, false) => Step::Stop,
        _ => Step::Stay,
    }
}

/// Runs `controller()` whenever this replica holds the Lease, until `shutdown` resolves; then
/// stops the controller and releases the Lease.
///
/// # Errors
/// Fails when the Lease cannot be created or read at start.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    namespace: &str,
    identity: &str,
    mut controller: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LeaseManagerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    let mut running: Option<JoinHandle<()>> = None;
    tokio::pin!(shutdown);
    loop {
        let is_leader = *leader.borrow_and_update();
        match next_step(running.is_some(), is_leader) {
            Step::Start => {
                info!(
                    identity,
                    "acquired the leader Lease; starting the controller"
                );
                running = Some(tokio::spawn(controller()));
            }
            Step::Stop => {
                info!(identity, "lost the leader Lease; stopping the controller");
                if let Some(task) = running.take() {
                    task.abort();
                }
            }
            Step::Stay => {}
        }
        tokio::select! {
            () = &mut shutdown => break,
            changed = leader.changed() => {
                if changed.is_err() {
                    break; // the lease task ended
                }
            }
        }
    }
    if let Some(task) = running.take() {
        task.abort();
    }
    // Dropping the receiver makes the lease task release the Lease and end.
    drop(leader);
    match lease_task.await {
        Ok(result) => result.map(|_| ()),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_decisions() {
        assert_eq!(next_step(false, true), Step::Start);
        assert_eq!(next_step(true, false), Step::Stop);
        assert_eq!(next_step(false, false), Step::Stay);
        assert_eq!(next_step(true, true), Step::Stay);
    }

    #[test]
    fn lease_timing_is_valid_for_the_manager() {
        // kube-lease-manager panics unless 0 < grace < duration.
        const { assert!(LEASE_GRACE_SECONDS > 0 && LEASE_GRACE_SECONDS < LEASE_DURATION_SECONDS) };
    }
}
