//! `--max-concurrent-requests`: how many gRPC calls the server works on at once. A call beyond
//! the limit fails at once with etcd's `etcdserver: too many requests` (ResourceExhausted, which
//! etcd clients retry with backoff), instead of queueing without bound.
//!
//! Long-lived calls (watch and keep-alive streams, snapshots, lock and election waits) are not
//! counted: they wait rather than work, and `--max-concurrent-streams` bounds them per
//! connection. Plain HTTP (the JSON gateway, /metrics, /health) is not counted either.

use std::future::{Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::future::Either;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// etcd's `ErrTooManyRequests` message.
pub const TOO_MANY_REQUESTS: &str = "etcdserver: too many requests";

/// gRPC methods that stay open for as long as the client wants: never counted.
const LONG_LIVED: &[&str] = &[
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Maintenance/Snapshot",
    "/v3lockpb.Lock/Lock",
    "/v3electionpb.Election/Campaign",
    "/v3electionpb.Election/Observe",
];

/// True for a request the limit counts: a gRPC call that is not long-lived.
pub fn counted<B>(req: &http::Request<B>) -> bool {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    grpc && !LONG_LIVED.contains(&req.uri().path())
}

/// A tower layer enforcing the limit over every connection of one listener set (the
/// semaphore is shared by all of them).
#[derive(Clone)]
pub struct RequestLimitLayer {
    permits: Arc<Semaphore>,
}

impl RequestLimitLayer {
    pub fn new(max_concurrent_requests: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(
                max_concurrent_requests.min(Semaphore::MAX_PERMITS),
            )),
        }
    }
}

impl<S> tower::Layer<S> for RequestLimitLayer {
    type Service = RequestLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestLimit {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RequestLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Permitted<S::Future>, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let permit = if counted(&req) {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                let refusal = tonic::Status::resource_exhausted(TOO_MANY_REQUESTS).into_http();
                return Either::Right(std::future::ready(Ok(refusal)));
            };
            Some(permit)
        } else {
            None
        };
        Either::Left(Permitted {
            fut: self.inner.call(req),
            permit,
        })
    }
}

pin_project_lite::pin_project! {
    /// A call's response future, holding the call's permit (if it is counted) until it
    /// completes or is dropped.
    pub struct Permitted<F> {
        #[pin]
        fut: F,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for Permitted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.fut.poll(cx));
        this.permit.take();
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::sync::oneshot;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    fn grpc(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(path)
            .header("content-type", "application/grpc")
            .body(())
            .expect("request")
    }

    fn code(r: &http::Response<String>) -> Option<&str> {
        r.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[test]
    fn long_lived_and_plain_http_calls_are_not_counted() {
        assert!(counted(&grpc("/etcdserverpb.KV/Range")));
        assert!(counted(&grpc("/etcdserverpb.Lease/LeaseGrant")));
        assert!(!counted(&grpc("/etcdserverpb.Watch/Watch")));
        assert!(!counted(&grpc("/v3lockpb.Lock/Lock")));
        let gateway = http::Request::builder()
            .uri("/v3/kv/range")
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        assert!(!counted(&gateway));
    }

    /// Two calls held open fill a limit of 2: the third is refused with etcd's error until
    /// one of them finishes; long-lived calls pass regardless.
    #[tokio::test]
    async fn calls_beyond_the_limit_are_refused_until_one_finishes() {
        let (release_tx, release_rx) =
            tokio::sync::mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
        let inner = tower::service_fn(move |_req: http::Request<()>| {
            let (tx, rx) = oneshot::channel::<()>();
            let release_tx = release_tx.clone();
            async move {
                let _ = release_tx.send(tx);
                let _ = rx.await;
                Ok::<_, Infallible>(http::Response::new(String::from("ok")))
            }
        });
        let mut svc = RequestLimitLayer::new(2).layer(inner);
        let a = tokio::spawn(svc.clone().oneshot(grpc("/etcdserverpb.KV/Put")));
        let b = tokio::spawn(svc.clone().oneshot(grpc("/etcdserverpb.KV/Put")));
        // Both are in the handler (each sent its release handle).
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(release_rx.lock().await.recv().await.expect("held"));
        }
        let refused = svc
            .ready()
            .await
            .expect("ready")
            .call(grpc("/etcdserverpb.KV/Range"))
            .await
            .expect("response");
        let status = tonic::Status::from_header_map(refused.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), TOO_MANY_REQUESTS);
        // A watch stream is not counted.
        let watch = tokio::spawn(svc.clone().oneshot(grpc("/etcdserverpb.Watch/Watch")));
        held.push(release_rx.lock().await.recv().await.expect("watch held"));
        // One finishes: the next call goes through.
        let _ = held.remove(0).send(());
        assert_eq!(a.await.expect("a").expect("a").body(), "ok");
        let c = tokio::spawn(svc.clone().oneshot(grpc("/etcdserverpb.KV/Range")));
        held.push(release_rx.lock().await.recv().await.expect("c held"));
        for h in held {
            let _ = h.send(());
        }
        for j in [b, watch, c] {
            assert_eq!(code(&j.await.expect("join").expect("call")), None);
        }
    }
}
