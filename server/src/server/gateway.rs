//! etcd's JSON gRPC-gateway on the client port: `POST /v3/kv/{range,put,deleterange,txn,
//! compaction}`, `POST /v3/maintenance/{status,alarm,defragment}` and `POST /v3/lease/{grant,
//! revoke,timetolive,leases}` (with etcd's `/v3/kv/lease/...` aliases), `POST /v3/auth/...`
//! (authenticate, enable, disable, status, user/..., role/...), as etcd 3.4/3.5 serve them,
//! and the streaming routes `POST /v3/watch` and `POST /v3/lease/keepalive`. A token goes in
//! the `Authorization` header, as with etcd's gateway.
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
//!   405 `Method Not Allowed`; an unknown `/v3/...` path 404 `Not Found`.
//!
//! # Streaming routes
//! grpc-gateway turns the body of `POST /v3/watch` or `/v3/lease/keepalive` into the client
//! half of the gRPC stream: a sequence of JSON requests, read as they arrive; the answers come
//! back as newline-delimited `{"result": <response>}` objects, one HTTP chunk each, driven by
//! the same per-stream logic as the gRPC methods ([`watch_service::open`],
//! [`lease_service::keep_alive`]). As in etcd 3.4:
//!
//! - The first request is decoded before anything is answered: if it is not valid JSON the
//!   answer is the plain error body with code 2 (Unknown) and HTTP 500 (grpc-gateway does not
//!   wrap stream decoding errors in InvalidArgument). A later undecodable request just ends
//!   the client half.
//! - The status line and headers go out with the first answer. A watch whose body holds no
//!   request answers nothing until the client goes away; a keepalive stream ends after its
//!   last answer (etcd's server returns once the client half ends), a watch stream stays open
//!   until the client disconnects, which releases its watchers.
//! - A request over the gRPC receive limit fails the stream: a stream error
//!   `{"error": {"grpc_code": 8, "http_code": 429, "message": ..., "http_status": ...}}`, with
//!   that HTTP status if nothing was answered before.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, on, MethodFilter, MethodRouter};
use axum::Router;
use futures::StreamExt;
use metastore_proto::etcdserverpb::auth_server::Auth;
use metastore_proto::etcdserverpb::kv_server::Kv;
use metastore_proto::etcdserverpb::lease_server::Lease;
use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use metastore_proto::etcdserverpb::{LeaseKeepAliveRequest, WatchRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Code, Status};

use super::auth_service::AuthService;
use super::config::GRPC_OVERHEAD_BYTES;
use super::kv_service::KvService;
use super::lease_service::LeaseService;
use super::maintenance_service::MaintenanceService;
use super::node::{Limits, NodeRef};
use super::{lease_service, watch_service};

/// What the handlers share: the same services the gRPC server runs, and the size limit.
#[derive(Clone)]
struct Gateway {
    kv: Arc<KvService>,
    auth: Arc<AuthService>,
    maintenance: Arc<MaintenanceService>,
    lease: Arc<LeaseService>,
    node: NodeRef,
    /// The gRPC receive limit, applied to the protobuf size of a decoded request.
    max_message_bytes: usize,
}

/// The gateway routes, to be merged into the client port's router.
pub fn router(node: NodeRef, limits: Limits) -> Router {
    let gateway = Gateway {
        kv: Arc::new(KvService::new(node.clone())),
        auth: Arc::new(AuthService::new(node.clone())),
        maintenance: Arc::new(MaintenanceService::new(node.clone())),
        lease: Arc::new(LeaseService::new(node.clone())),
        node,
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
        .route("/v3/auth/authenticate", post_only(authenticate))
        .route("/v3/auth/enable", post_only(auth_enable))
        .route("/v3/auth/disable", post_only(auth_disable))
        .route("/v3/auth/status", post_only(auth_status))
        .route("/v3/auth/user/add", post_only(user_add))
        .route("/v3/auth/user/get", post_only(user_get))
        .route("/v3/auth/user/list", post_only(user_list))
        .route("/v3/auth/user/delete", post_only(user_delete))
        .route("/v3/auth/user/changepw", post_only(user_change_password))
        .route("/v3/auth/user/grant", post_only(user_grant_role))
        .route("/v3/auth/user/revoke", post_only(user_revoke_role))
        .route("/v3/auth/role/add", post_only(role_add))
        .route("/v3/auth/role/get", post_only(role_get))
        .route("/v3/auth/role/list", post_only(role_list))
        .route("/v3/auth/role/delete", post_only(role_delete))
        .route("/v3/auth/role/grant", post_only(role_grant_permission))
        .route("/v3/auth/role/revoke", post_only(role_revoke_permission))
        .route("/v3/watch", post_only(watch))
        .route("/v3/lease/keepalive", post_only(lease_keep_alive))
        // Not `Router::fallback`: that would also catch unknown gRPC methods, which must keep
        // answering `Unimplemented`.
        .route("/v3/", any(not_found))
        .route("/v3/{*rest}", any(not_found))
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

/// Go's `http.NotFound`, as etcd answers a path it does not serve.
async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        "Not Found\n",
    )
        .into_response()
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
route!(authenticate, auth.authenticate);
route!(auth_enable, auth.auth_enable);
route!(auth_disable, auth.auth_disable);
route!(auth_status, auth.auth_status);
route!(user_add, auth.user_add);
route!(user_get, auth.user_get);
route!(user_list, auth.user_list);
route!(user_delete, auth.user_delete);
route!(user_change_password, auth.user_change_password);
route!(user_grant_role, auth.user_grant_role);
route!(user_revoke_role, auth.user_revoke_role);
route!(role_add, auth.role_add);
route!(role_get, auth.role_get);
route!(role_list, auth.role_list);
route!(role_delete, auth.role_delete);
route!(role_grant_permission, auth.role_grant_permission);
route!(role_revoke_permission, auth.role_revoke_permission);
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
        let msg: T = self.check_size(decode_json(&bytes)?)?;
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
    match first {
        None => Ok(T::default()),
        Some(Err(e)) => Err(Status::invalid_argument(e.to_string())),
        Some(Ok(v)) => decode_value(v),
    }
}

/// Decodes one JSON value as jsonpb does: `null` is the empty request; it must otherwise be
/// an object; `null` members are unset.
fn decode_value<T: DeserializeOwned + Default>(mut value: serde_json::Value) -> Result<T, Status> {
    if value.is_null() {
        return Ok(T::default());
    }
    if let Some(kind) = go_kind(&value) {
        return Err(Status::invalid_argument(format!(
            "json: cannot unmarshal {kind} into Go value of type map[string]json.RawMessage"
        )));
    }
    drop_nulls(&mut value);
    serde_json::from_value(value).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Reads a request body as a sequence of JSON values, each as soon as it is complete (Go's
/// `json.Decoder` over the body, as grpc-gateway reads a client stream).
struct JsonReader {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    /// How far `buf` has been scanned for the end of its first value.
    scan: Scan,
    eof: bool,
    /// Most bytes buffered for one value.
    limit: usize,
}

/// Where the first JSON value of a buffer ends, found without parsing it: nesting depth
/// outside strings, and whether a string is open.
#[derive(Default)]
struct Scan {
    pos: usize,
    depth: usize,
    started: bool,
    in_string: bool,
    escaped: bool,
}

impl Scan {
    /// Scans `buf` from where it left off; returns the end of the first value if complete.
    fn end(&mut self, buf: &[u8]) -> Option<usize> {
        while let Some(&b) = buf.get(self.pos) {
            let i = self.pos;
            self.pos += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                continue;
            }
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {
                    // The end of a scalar at the top level.
                    if self.started && self.depth == 0 {
                        return Some(i);
                    }
                }
                b'{' | b'[' => {
                    self.started = true;
                    self.depth += 1;
                }
                b'}' | b']' => {
                    self.started = true;
                    if self.depth <= 1 {
                        // Complete (or unbalanced: the parser reports it).
                        return Some(i + 1);
                    }
                    self.depth -= 1;
                }
                b'"' => {
                    self.started = true;
                    self.in_string = true;
                }
                _ => self.started = true,
            }
        }
        None
    }
}

impl JsonReader {
    fn new(body: Body, limit: usize) -> Self {
        Self {
            body: body.into_data_stream(),
            buf: Vec::new(),
            scan: Scan::default(),
            eof: false,
            limit,
        }
    }

    /// The next JSON value of the body: `None` at its end, an InvalidArgument status if it is
    /// not valid JSON, ResourceExhausted if it is over the buffer limit, Cancelled if the body
    /// was cut short.
    async fn next_value(&mut self) -> Option<Result<serde_json::Value, Status>> {
        loop {
            if let Some(end) = self.scan.end(&self.buf) {
                let value = serde_json::from_slice(&self.buf[..end])
                    .map_err(|e| Status::invalid_argument(e.to_string()));
                self.buf.drain(..end);
                self.scan = Scan::default();
                return Some(value);
            }
            if self.eof {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return None;
                }
                let rest = std::mem::take(&mut self.buf);
                return Some(
                    serde_json::from_slice(&rest)
                        .map_err(|e| Status::invalid_argument(e.to_string())),
                );
            }
            match self.body.next().await {
                Some(Ok(chunk)) => {
                    if self.buf.len() + chunk.len() > self.limit {
                        self.eof = true;
                        return Some(Err(Status::resource_exhausted(format!(
                            "grpc: received message larger than max (request over {} bytes)",
                            self.limit
                        ))));
                    }
                    self.buf.extend_from_slice(&chunk);
                }
                None => self.eof = true,
                // The client went away in the middle of its body. hyper does not notice that
                // the connection is gone while a response stream is idle, so the stream must
                // end from here.
                Some(Err(e)) => {
                    self.eof = true;
                    self.buf.clear();
                    return Some(Err(Status::cancelled(e.to_string())));
                }
            }
        }
    }
}

impl Gateway {
    /// The next request of a client stream, checked against the gRPC receive limit like one
    /// sent over gRPC.
    async fn next_request<T>(&self, reader: &mut JsonReader) -> Option<Result<T, Status>>
    where
        T: DeserializeOwned + prost::Message + Default,
    {
        let msg = match reader.next_value().await? {
            Ok(v) => decode_value::<T>(v),
            Err(e) => Err(e),
        };
        Some(msg.and_then(|m| self.check_size(m)))
    }

    fn check_size<T: prost::Message>(&self, msg: T) -> Result<T, Status> {
        let len = msg.encoded_len();
        if len > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "grpc: received message larger than max ({len} vs. {})",
                self.max_message_bytes
            )));
        }
        Ok(msg)
    }

    /// The client half of a stream: the first request (already read), then the rest of the
    /// body. A later request that does not decode ends it (grpc-gateway just closes the
    /// send side); one over the size limit fails it.
    fn client_stream<T>(
        self,
        first: Option<Result<T, Status>>,
        reader: JsonReader,
    ) -> impl futures::Stream<Item = Result<T, Status>> + Send + Unpin + 'static
    where
        T: DeserializeOwned + prost::Message + Default + Send + 'static,
    {
        let more = matches!(first, Some(Ok(_)));
        let rest =
            futures::stream::unfold((self, reader, more), |(g, mut reader, more)| async move {
                if !more {
                    return None;
                }
                match g.next_request::<T>(&mut reader).await? {
                    Ok(m) => Some((Ok(m), (g, reader, true))),
                    Err(s) if ends_stream(&s) => Some((Err(s), (g, reader, false))),
                    Err(_) => None,
                }
            });
        Box::pin(futures::stream::iter(first).chain(rest))
    }

    /// Reads the first request of a stream (`None`: the body holds none). `Err` is the answer
    /// to send instead of a stream: a first request that does not decode is refused with
    /// code Unknown, HTTP 500 (grpc-gateway does not wrap stream decoding errors in
    /// InvalidArgument).
    async fn first_request<T>(
        &self,
        reader: &mut JsonReader,
    ) -> Result<Option<Result<T, Status>>, Response>
    where
        T: DeserializeOwned + prost::Message + Default,
    {
        match self.next_request::<T>(reader).await {
            Some(Err(s)) if !ends_stream(&s) => Err(error(&Status::unknown(s.message()))),
            first => Ok(first),
        }
    }
}

/// Whether a client-stream error fails the stream (too large; the client went away) rather
/// than just ending the client half (a request that does not decode).
fn ends_stream(s: &Status) -> bool {
    matches!(s.code(), Code::ResourceExhausted | Code::Cancelled)
}

async fn watch(State(g): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    // grpc-gateway passes the `Authorization` header as `authorization` metadata.
    let creds = crate::auth::Credentials {
        token: headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        common_name: None,
    };
    let mut reader = JsonReader::new(body, g.max_message_bytes.saturating_mul(2));
    let first = match g.first_request::<WatchRequest>(&mut reader).await {
        Ok(first) => first,
        Err(resp) => return resp,
    };
    // The watch stream ends quietly when its client half fails (a request over the size
    // limit); the gateway then writes the reason as the stream's last line.
    let failure: Arc<Mutex<Option<Status>>> = Arc::default();
    let slot = failure.clone();
    let inbound = g.clone().client_stream(first, reader).inspect(move |r| {
        if let (Err(s), Ok(mut slot)) = (r, slot.lock()) {
            // Nobody is left to read why a cut-off client's stream ended.
            if s.code() != Code::Cancelled {
                *slot = Some(s.clone());
            }
        }
    });
    let out =
        match watch_service::open(&g.node, inbound, watch_service::InboundEnd::KeepOpen, creds) {
            Ok(out) => out,
            Err(s) => return error(&s),
        };
    let tail =
        futures::stream::once(
            async move { failure.lock().ok().and_then(|mut s| s.take()).map(Err) },
        )
        .filter_map(futures::future::ready);
    stream_response(out.map(|o| Ok(o.into_response())).chain(tail)).await
}

async fn lease_keep_alive(State(g): State<Gateway>, body: Body) -> Response {
    let mut reader = JsonReader::new(body, g.max_message_bytes.saturating_mul(2));
    let first = match g.first_request::<LeaseKeepAliveRequest>(&mut reader).await {
        Ok(first) => first,
        Err(resp) => return resp,
    };
    let inbound = g.clone().client_stream(first, reader);
    match lease_service::keep_alive(&g.node, inbound) {
        Ok(out) => stream_response(out).await,
        Err(s) => error(&s),
    }
}

/// A server stream as grpc-gateway writes it: nothing until the first message, then 200 and
/// one `{"result": ...}` line per message, each its own chunk; an error ends the stream with
/// an `{"error": {...}}` line (and its HTTP status, if it comes first).
async fn stream_response<S, T>(out: S) -> Response
where
    S: futures::Stream<Item = Result<T, Status>> + Send + 'static,
    T: Serialize + Send + 'static,
{
    let mut out = Box::pin(out);
    let first = out.next().await;
    let (code, first, grpc_header) = match first {
        None => (StatusCode::OK, None, false),
        Some(Err(s)) => (http_status(s.code()), Some(Err(s)), false),
        Some(Ok(m)) => (StatusCode::OK, Some(Ok(m)), true),
    };
    let mut failed = false;
    let lines = futures::stream::iter(first)
        .chain(out)
        .take_while(move |item| {
            // Nothing after the first error.
            let go = !failed;
            failed |= item.is_err();
            futures::future::ready(go)
        })
        .map(|item| Ok::<_, std::convert::Infallible>(Bytes::from(stream_line(item))));
    let mut resp = Response::new(Body::from_stream(lines));
    *resp.status_mut() = code;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if grpc_header {
        h.insert(
            GRPC_METADATA_CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
    }
    resp
}

/// The header grpc-gateway copies from the gRPC response headers (`content-type`).
const GRPC_METADATA_CONTENT_TYPE: &str = "grpc-metadata-content-type";

/// One line of a server stream: `{"result": msg}\n`, or grpc-gateway v1's stream error
/// (without the newline).
fn stream_line<T: Serialize>(item: Result<T, Status>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Chunk<T> {
        result: T,
    }
    #[derive(Serialize)]
    struct StreamError<'a> {
        error: StreamErrorBody<'a>,
    }
    #[derive(Serialize)]
    struct StreamErrorBody<'a> {
        grpc_code: i32,
        http_code: u16,
        message: &'a str,
        http_status: &'a str,
    }
    let encoded = match &item {
        Ok(result) => serde_json::to_vec(&Chunk { result }),
        Err(s) => {
            let code = http_status(s.code());
            serde_json::to_vec(&StreamError {
                error: StreamErrorBody {
                    grpc_code: s.code() as i32,
                    http_code: code.as_u16(),
                    message: s.message(),
                    http_status: code.canonical_reason().unwrap_or(""),
                },
            })
        }
    };
    // Serialising a generated message cannot fail; write an empty line if it did.
    let mut line = encoded.unwrap_or_default();
    // grpc-gateway writes the delimiter after results only.
    if item.is_ok() {
        line.push(b'\n');
    }
    line
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
        Ok(body) => {
            let mut resp = json(StatusCode::OK, body);
            resp.headers_mut().insert(
                GRPC_METADATA_CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            resp
        }
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
    fn finds_where_each_streamed_value_ends() {
        let ends = |text: &[u8]| {
            let (mut scan, mut out, mut from) = (Scan::default(), Vec::new(), 0);
            while let Some(end) = scan.end(&text[from..]) {
                out.push(
                    String::from_utf8_lossy(&text[from..from + end])
                        .trim()
                        .to_string(),
                );
                from += end;
                scan = Scan::default();
            }
            out
        };
        assert_eq!(
            ends(br#" {"a":"}{\"]"} [1,{"b":[]}]null "x\"y" {"open":"#),
            [r#"{"a":"}{\"]"}"#, r#"[1,{"b":[]}]"#, "null", r#""x\"y""#]
        );
        // A value split across reads is found once it is complete.
        let mut scan = Scan::default();
        assert_eq!(scan.end(br#"{"a":{"#), None);
        assert_eq!(scan.end(br#"{"a":{"b":1}}  "#), Some(13));
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
