//! [`KvRouteLayer`]: `etcdserverpb.KV` calls go straight to the KV service, past the router.
//!
//! tonic's `Routes` is an axum router: for every call it matches the path, records the matched
//! path and the path parameters in the request's extensions (three insertions, a map made
//! and grown), clones the route's boxed service and boxes its future and the response body
//! again. That was ~4,700 of a put's ~108,000 server instructions (callgrind,
//! docs/PERFORMANCE.md, session 40). The KV methods (Range, Put, DeleteRange, Txn, Compact)
//! carry nearly every request a client sends, so their calls skip it: this layer sits in
//! front of the router and hands a call whose path names the KV service to the same
//! configured `KvServer` the router holds. Every other call, the JSON gateway and `/metrics`
//! included, goes through the router as before. The KV server answers a method it does not
//! know with `Unimplemented`, as the router's route to it did.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::Either;
use tonic::body::Body;

/// The path prefix of the KV service's methods.
const KV_PREFIX: &str = "/etcdserverpb.KV/";

/// Installs [`KvRoute`] in front of a service (tonic's router), with `kv` the KV service.
#[derive(Clone)]
pub struct KvRouteLayer<K> {
    kv: K,
}

impl<K> KvRouteLayer<K> {
    pub fn new(kv: K) -> Self {
        Self { kv }
    }
}

impl<K: Clone, S> tower::Layer<S> for KvRouteLayer<K> {
    type Service = KvRoute<K, S>;
    fn layer(&self, inner: S) -> Self::Service {
        KvRoute {
            kv: self.kv.clone(),
            inner,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct KvRoute<K, S> {
    kv: K,
    inner: S,
}

impl<K, S> tower::Service<http::Request<Body>> for KvRoute<K, S>
where
    K: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone,
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<K::Future, S::Future>;

    /// Ready when the router is: the generated KV server is always ready (it takes each
    /// call on a clone of itself, and so does `call` here).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path().starts_with(KV_PREFIX) {
            Either::Left(self.kv.clone().call(req))
        } else {
            Either::Right(self.inner.call(req))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Ready;

    use http_body_util::BodyExt;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// A service answering every call with `name` and the path it was called with.
    #[derive(Clone)]
    struct Named(&'static str);

    impl tower::Service<http::Request<Body>> for Named {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<Body>) -> Self::Future {
            let text = format!("{} {}", self.0, req.uri().path());
            std::future::ready(Ok(http::Response::new(Body::new(text))))
        }
    }

    async fn who_answers(path: &str) -> anyhow::Result<String> {
        let mut svc = KvRouteLayer::new(Named("kv")).layer(Named("router"));
        let req = http::Request::post(path).body(Body::empty())?;
        let res = svc.ready().await?.call(req).await?;
        let body = res.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(body.to_vec())?)
    }

    #[tokio::test]
    async fn kv_calls_go_to_the_kv_service_and_the_rest_to_the_router() -> anyhow::Result<()> {
        for method in [
            "Put",
            "Range",
            "Txn",
            "DeleteRange",
            "Compact",
            "NoSuchMethod",
        ] {
            let path = format!("/etcdserverpb.KV/{method}");
            assert_eq!(who_answers(&path).await?, format!("kv {path}"));
        }
        for path in [
            "/etcdserverpb.Lease/LeaseGrant",
            "/etcdserverpb.KVX/Put",
            "/etcdserverpb.KV",
            "/v3/kv/put",
            "/metrics",
            "/",
        ] {
            assert_eq!(who_answers(path).await?, format!("router {path}"));
        }
        Ok(())
    }
}
