//! etcd's JSON gRPC-gateway on the client port: `POST /v3/kv/{range,put,deleterange,txn,
//! compaction}`, `POST /v3/maintenance/{status,alarm,defragment}` and `POST /v3/lease/{grant,
//! revoke,timetolive,leases}` (with etcd's `/v3/kv/lease/...` aliases), as etcd 3.4/3.5 serve
//! them. The streaming routes (`/v3/watch`, `/v3/lease/keepalive`) are not served yet.
//!
//! Each handler decodes the JSON body into the prost request, calls the same tonic service
//! method a gRPC client reaches, and writes the response (or the error) the way etcd's
//! grpc-gateway v1 does:
//!
//! - JSON is jsonpb with `OrigName`: the serde impls generated into `metastore-proto` by
//!   `pbjson-build` (proto field names, 64-bit integers as strings, bytes as base64, enums by
//!   name, defaults omitted, unknown input fields ignored).
//! - Input is read like Go's `json.Decoder` feeding jsonpb: an empty body or `null` is the
//!   empty request, the first JSON value is used and anything after it ignored, a repeated
//!   field name keeps its last value, `null` fields are unset.
//! - An error is `{"error": msg, "message": msg, "code": grpc_code}` with the HTTP status
//!   grpc-gateway derives from the gRPC code (OutOfRange → 400, NotFound → 404, ...).
//! - Size: etcd's gateway forwards the request over gRPC, so the gRPC receive limit
//!   (`--max-request-bytes` + 512 KiB) applies to the *protobuf* size of the decoded request,
//!   with grpc-go's `ResourceExhausted` message; below it the services answer
//!   `etcdserver: request is too large` as over gRPC. The raw JSON body is bounded separately
//!   (twice the gRPC limit: base64 makes JSON about 4/3 of the protobuf size), only to bound
//!   memory; every request etcd would accept fits under it.
//! - Every gateway answer carries etcd's CORS headers; `OPTIONS` answers 200, other methods
//!   405 `Method Not Allowed`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use metastore_proto::etcdserverpb::kv_server::Kv;
use metastore_proto::etcdserverpb::lease_server::Lease;
use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Code, Status};

use super::config::GRPC_OVERHEAD_BYTES;
use super::kv_service::KvService;
use super::lease_service::LeaseService;
use super::maintenance_service::MaintenanceService;
use super::node::{Limits, NodeRef};

/// What the handlers share: the same services the gRPC server runs, and the size limit.
#[derive(Clone)]
struct Gateway {
    kv: Arc<KvService>,
    maintenance: Arc<MaintenanceService>,
    lease: Arc<LeaseService>,
    /// The gRPC receive limit, applied to the protobuf size of a decoded request.
    max_message_bytes: usize,
}

/// The gateway routes, to be merged into the client port's router.
pub fn router(node: NodeRef, limits: Limits) -> Router {
    let gateway = Gateway {
        kv: Arc::new(KvService::new(node.clone())),
        maintenance: Arc::new(MaintenanceService::new(node.clone())),
        lease: Arc::new(LeaseService::new(node)),
        max_message_bytes: limits.max_request_bytes + GRPC_OVERHEAD_BYTES,
    };
    Router::new()
        .route("/v3/kv/range", post_only(range))
        .route("/v3/kv/put", post_only(put))
        .route("/v3/kv/deleterange", post_only(delete_range))
        .route("/v3/kv/txn", post_only(txn))
        .route("/v3/kv/compaction", post_only(compaction))
        .route("/v3/maintenance/status", post_only(status))
        .route("/v3/maintenance/alarm", post_only(alarm))
        .route("/v3/maintenance/defragment", post_only(defragment))
        .route("/v3/lease/grant", post_only(lease_grant))
        .route("/v3/lease/revoke", post_only(lease_revoke))
        .route("/v3/kv/lease/revoke", post_only(lease_revoke))
        .route("/v3/lease/timetolive", post_only(lease_time_to_live))
        .route("/v3/kv/lease/timetolive", post_only(lease_time_to_live))
        .route("/v3/lease/leases", post_only(lease_leases))
        .route("/v3/kv/lease/leases", post_only(lease_leases))
        .layer(axum::middleware::map_response(cors))
        .with_state(gateway)
}

/// `POST` to `handler`; `OPTIONS` (a CORS preflight) answers 200; anything else 405.
fn post_only<H, T>(handler: H) -> MethodRouter<Gateway>
where
    H: axum::handler::Handler<T, Gateway>,
    T: 'static,
{
    axum::routing::post(handler)
        .merge(on(MethodFilter::OPTIONS, || async { StatusCode::OK }))
        .fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "Method Not Allowed\n",
            )
        })
}

/// etcd's CORS headers (its default `--cors` is `*`).
async fn cors(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    resp
}

/// One gateway route: decode the JSON request, call the service method, encode the answer.
macro_rules! route {
    ($name:ident, $svc:ident . $method:ident) => {
        async fn $name(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
            match g.decode(&headers, body).await {
                Ok(req) => reply(g.$svc.$method(req).await),
                Err(status) => error(&status),
            }
        }
    };
}

route!(alarm, maintenance.alarm);
route!(defragment, maintenance.defragment);
route!(lease_grant, lease.lease_grant);
route!(lease_revoke, lease.lease_revoke);
route!(lease_time_to_live, lease.lease_time_to_live);
route!(lease_leases, lease.lease_leases);

async fn range(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    match g.decode(&headers, body).await {
        Ok(req) => reply(g.kv.range(req).await),
        Err(status) => error(&status),
    }
}

async fn put(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    match g.decode(&headers, body).await {
        Ok(req) => reply(g.kv.put(req).await),
        Err(status) => error(&status),
    }
}

async fn delete_range(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    match g.decode(&headers, body).await {
        Ok(req) => reply(g.kv.delete_range(req).await),
        Err(status) => error(&status),
    }
}

async fn txn(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    match g.decode(&headers, body).await {
        Ok(req) => reply(g.kv.txn(req).await),
        Err(status) => error(&status),
    }
}

async fn compaction(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    match g.decode(&headers, body).await {
        Ok(req) => reply(g.kv.compact(req).await),
        Err(status) => error(&status),
    }
}

async fn status(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    match g.decode(&headers, body).await {
        Ok(req) => reply(g.maintenance.status(req).await),
        Err(status) => error(&status),
    }
}

impl Gateway {
    /// Reads the body and decodes it into the request a gRPC client would have sent,
    /// carrying the `Authorization` header as `authorization` metadata as grpc-gateway does.
    async fn decode<T>(&self, headers: &HeaderMap, body: Body) -> Result<tonic::Request<T>, Status>
    where
        T: DeserializeOwned + prost::Message + Default,
    {
        let bytes = read_body(body, self.max_message_bytes.saturating_mul(2)).await?;
        let msg: T = decode_json(&bytes)?;
        let len = msg.encoded_len();
        if len > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "grpc: received message larger than max ({len} vs. {})",
                self.max_message_bytes
            )));
        }
        let mut req = tonic::Request::new(msg);
        if let Some(v) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// Reads the whole body, refusing more than `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, Status> {
    use tokio_stream::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk: Bytes = chunk.map_err(|e| Status::invalid_argument(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(Status::resource_exhausted(format!(
                "grpc: received message larger than max (request body over {limit} bytes)"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Decodes a request body as etcd's gateway does (Go's `json.Decoder` into jsonpb): the first
/// JSON value in the body; none or `null` is the empty request; it must otherwise be an
/// object; a repeated name keeps its last value; `null` members are unset.
fn decode_json<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    let first = serde_json::Deserializer::from_slice(body)
        .into_iter::<serde_json::Value>()
        .next();
    let mut value = match first {
        None | Some(Ok(serde_json::Value::Null)) => return Ok(T::default()),
        Some(Err(e)) => return Err(Status::invalid_argument(e.to_string())),
        Some(Ok(v)) => v,
    };
    if let Some(kind) = go_kind(&value) {
        return Err(Status::invalid_argument(format!(
            "json: cannot unmarshal {kind} into Go value of type map[string]json.RawMessage"
        )));
    }
    drop_nulls(&mut value);
    serde_json::from_value(value).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The name Go's `encoding/json` gives a JSON value that is not an object.
fn go_kind(v: &serde_json::Value) -> Option<&'static str> {
    use serde_json::Value as V;
    match v {
        V::Object(_) => None,
        V::Array(_) => Some("array"),
        V::String(_) => Some("string"),
        V::Number(_) => Some("number"),
        V::Bool(_) => Some("bool"),
        V::Null => Some("null"),
    }
}

/// jsonpb treats a `null` member as absent, at every depth.
fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, m| !m.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// A service answer as the gateway writes it: the message as JSON, or the error.
fn reply<T: Serialize>(result: Result<tonic::Response<T>, Status>) -> Response {
    let msg = match result {
        Ok(resp) => resp.into_inner(),
        Err(status) => return error(&status),
    };
    match serde_json::to_vec(&msg) {
        Ok(body) => json(StatusCode::OK, body),
        Err(e) => error(&Status::internal(e.to_string())),
    }
}

/// grpc-gateway v1's error body and HTTP status for a gRPC status.
fn error(status: &Status) -> Response {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        message: &'a str,
        code: i32,
    }
    let body = ErrorBody {
        error: status.message(),
        message: status.message(),
        code: status.code() as i32,
    };
    // Serialising two strings and an integer cannot fail; answer an empty body if it did.
    json(
        http_status(status.code()),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

fn json(code: StatusCode, body: Vec<u8>) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// grpc-gateway v1's `HTTPStatusFromCode`.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        // As etcd 3.4.23's gateway answers it (e.g. "lease already exists").
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::{RangeRequest, StatusResponse};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn decodes_like_go() -> TestResult {
        assert_eq!(decode_json::<RangeRequest>(b"")?, RangeRequest::default());
        assert_eq!(
            decode_json::<RangeRequest>(b" null ")?,
            RangeRequest::default()
        );
        // Last duplicate wins, null is unset, what follows the first value is ignored.
        let r: RangeRequest = decode_json(br#"{"key":"YQ==","key":"Yg==","limit":null} xx"#)?;
        assert_eq!(&r.key[..], b"b");
        // 64-bit integers as strings, lowerCamelCase names, enums by name, unknown fields.
        let r: RangeRequest = decode_json(
            br#"{"key":"YQ==","limit":"2","keysOnly":true,"sort_order":"DESCEND","x":1}"#,
        )?;
        assert_eq!((r.limit, r.keys_only, r.sort_order), (2, true, 2));
        let e = decode_json::<RangeRequest>(b"[]")
            .err()
            .map(|s| s.message().to_string());
        assert_eq!(
            e.as_deref(),
            Some("json: cannot unmarshal array into Go value of type map[string]json.RawMessage")
        );
        assert!(decode_json::<RangeRequest>(br#"{"sort_order":"FOO"}"#).is_err());
        assert!(decode_json::<RangeRequest>(br#"{"key":5}"#).is_err());
        Ok(())
    }

    #[test]
    fn encodes_with_proto_names() -> TestResult {
        let s = StatusResponse {
            db_size: 20480,
            version: "3.5.16".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&s)?;
        assert_eq!(
            v,
            serde_json::json!({"version": "3.5.16", "dbSize": "20480"})
        );
        Ok(())
    }

    #[test]
    fn grpc_gateway_status_table() {
        assert_eq!(http_status(Code::OutOfRange), StatusCode::BAD_REQUEST);
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
