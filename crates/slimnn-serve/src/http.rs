//! REST: the Open Inference Protocol v2 endpoints, the repository extension, `/metrics` and the
//! OpenAI-style `/v1/embeddings`.

use crate::codec::{self, datatype_name, JsonData, OutputRequest};
use crate::embeddings;
use crate::error::ServeError;
use crate::model::LoadedModel;
use crate::server::AppState;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use slimnn_tensor::Tensor;
use std::sync::Arc;
use std::time::Instant;

const HEADER_LEN: &str = "inference-header-content-length";

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        (self.status(), Json(json!({ "error": self.message() }))).into_response()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route("/v2/repository/models/{name}/unload", post(repository_unload))
        .route("/v1/embeddings", post(embeddings_endpoint))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move {
            ServeError::NotFound(format!("no endpoint {} {}", req.method(), req.uri().path()))
        })
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Counts every model request in the metrics, labelled by model when the model is known, and
/// refuses a body whose declared length is over the limit before reading any of it.
async fn record(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = state.config.max_body_bytes;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let e = ServeError::PayloadTooLarge(format!("request body is larger than the limit of {limit} bytes"));
        state.metrics.request("", "http", e.status().as_u16(), std::time::Duration::ZERO);
        return e.into_response();
    }
    let path = req.uri().path();
    let model = path
        .strip_prefix("/v2/models/")
        .and_then(|rest| rest.split('/').next())
        .map(|m| m.to_string())
        .or_else(|| (path == "/v1/embeddings").then(|| "embeddings".to_string()));
    let Some(mut model) = model else { return next.run(req).await };
    if !state.repo.versions(&model).iter().any(|_| true) && model != "embeddings" {
        model.clear(); // keeps unknown names out of the metric labels
    }
    let started = Instant::now();
    let resp = next.run(req).await;
    state.metrics.request(&model, "http", resp.status().as_u16(), started.elapsed());
    if resp.status().is_server_error() && resp.status() != StatusCode::SERVICE_UNAVAILABLE {
        tracing::warn!(model = %model, status = resp.status().as_u16(), "request failed");
    }
    resp
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.ready();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({ "ready": ready }))).into_response()
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(crate::server::server_metadata_json())
}

#[derive(Serialize)]
struct TensorMeta<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: Vec<i64>,
}

fn metadata_json(state: &AppState, m: &LoadedModel) -> serde_json::Value {
    let meta = |specs: &'_ [crate::model::TensorSpec]| -> Vec<serde_json::Value> {
        specs
            .iter()
            .map(|s| {
                serde_json::to_value(TensorMeta {
                    name: &s.name,
                    datatype: datatype_name(s.dtype).unwrap_or("?"),
                    shape: s.wire_shape(),
                })
                .unwrap_or_default()
            })
            .collect()
    };
    json!({
        "name": m.source.name,
        "versions": state.repo.versions(&m.source.name),
        "platform": "slimnn",
        "inputs": meta(&m.signature.inputs),
        "outputs": meta(&m.signature.outputs),
    })
}

async fn model_metadata(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.repo.resolve(&name, None) {
        Ok(m) => Json(metadata_json(&state, &m)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model_metadata_v(State(state): State<Arc<AppState>>, Path((name, v)): Path<(String, String)>) -> Response {
    match state.repo.resolve(&name, Some(&v)) {
        Ok(m) => Json(metadata_json(&state, &m)).into_response(),
        Err(e) => e.into_response(),
    }
}

fn ready_response(state: &AppState, name: &str, version: Option<&str>) -> Response {
    match state.repo.resolve(name, version) {
        Ok(_) => Json(json!({ "name": name, "ready": true })).into_response(),
        Err(ServeError::NotFound(m)) => ServeError::NotFound(m).into_response(),
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "name": name, "ready": false, "error": e.message() })))
                .into_response()
        }
    }
}

async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    ready_response(&state, &name, None)
}

async fn model_ready_v(State(state): State<Arc<AppState>>, Path((name, v)): Path<(String, String)>) -> Response {
    ready_response(&state, &name, Some(&v))
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infer_rest(&state, &name, None, &headers, body).await.unwrap_or_else(|e| e.into_response())
}

async fn infer_v(
    State(state): State<Arc<AppState>>,
    Path((name, v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infer_rest(&state, &name, Some(&v), &headers, body).await.unwrap_or_else(|e| e.into_response())
}

/// A body rejection (too large, or cut off) as a clear 4xx.
pub fn body_error(e: BytesRejection, limit: usize) -> ServeError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ServeError::PayloadTooLarge(format!("request body is larger than the limit of {limit} bytes"))
    } else {
        ServeError::BadRequest(format!("could not read the request body: {e}"))
    }
}

async fn infer_rest(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ServeError> {
    let model = state.repo.resolve(name, version)?;
    let body = body.map_err(|e| body_error(e, state.config.max_body_bytes))?;
    let header_len = match headers.get(HEADER_LEN) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| ServeError::BadRequest("Inference-Header-Content-Length is not a byte count".into()))?,
        ),
        None => None,
    };
    let req = codec::decode_rest(&body, header_len)?;
    drop(body);
    let wanted = select_outputs(&model, &req.outputs, req.binary_default)?;
    let inputs = codec::bind_inputs(&model.signature, req.inputs)?;
    let outputs = state.infer(&model, inputs).await?;
    encode_rest(&model, req.id.as_deref(), &outputs, &wanted)
}

/// Output indices and binary flags, checked against the signature before anything runs.
fn select_outputs(
    model: &LoadedModel,
    requested: &[OutputRequest],
    binary_default: bool,
) -> Result<Vec<(usize, bool)>, ServeError> {
    if requested.is_empty() {
        return Ok((0..model.signature.outputs.len()).map(|i| (i, binary_default)).collect());
    }
    requested
        .iter()
        .map(|o| {
            let i =
                model.signature.outputs.iter().position(|s| s.name == o.name).ok_or_else(|| {
                    ServeError::BadRequest(format!("output '{}': the model has no such output", o.name))
                })?;
            Ok((i, o.binary))
        })
        .collect()
}

#[derive(Serialize)]
struct OutJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct InferJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutJson<'a>>,
}

fn encode_rest(
    model: &LoadedModel,
    id: Option<&str>,
    outputs: &[Tensor],
    wanted: &[(usize, bool)],
) -> Result<Response, ServeError> {
    let mut binary: Vec<u8> = Vec::new();
    let mut outs = Vec::with_capacity(wanted.len());
    for &(i, bin) in wanted {
        let t = outputs.get(i).ok_or_else(|| ServeError::Internal(format!("the model gave no output {i}")))?;
        let spec = &model.signature.outputs[i];
        let datatype = datatype_name(t.dtype()).unwrap_or("?");
        if bin {
            let bytes = t.to_le_bytes();
            let parameters = Some(json!({ "binary_data_size": bytes.len() }));
            binary.extend_from_slice(&bytes);
            outs.push(OutJson { name: &spec.name, datatype, shape: t.shape(), parameters, data: None });
        } else {
            outs.push(OutJson {
                name: &spec.name,
                datatype,
                shape: t.shape(),
                parameters: None,
                data: Some(JsonData::of(t)),
            });
        }
    }
    let doc = InferJson { model_name: &model.source.name, model_version: &model.source.version, id, outputs: outs };
    let mut body = serde_json::to_vec(&doc).map_err(|e| ServeError::Internal(e.to_string()))?;
    if binary.is_empty() {
        return Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response());
    }
    let json_len = body.len();
    body.extend_from_slice(&binary);
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert(HEADER_LEN, HeaderValue::from(json_len));
    Ok(resp)
}

async fn repository_index(State(state): State<Arc<AppState>>) -> Response {
    Json(state.repo.index()).into_response()
}

fn control_allowed(state: &AppState) -> Result<(), ServeError> {
    if state.config.model_control {
        Ok(())
    } else {
        Err(ServeError::Forbidden("model control is off; start the server with --model-control to enable it".into()))
    }
}

async fn repository_load(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if let Err(e) = control_allowed(&state) {
        return e.into_response();
    }
    let repo = state.repo.clone();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || repo.load(&n)).await {
        Ok(Ok(())) => Json(json!({ "name": name, "loaded": true })).into_response(),
        Ok(Err(e)) => ServeError::BadRequest(format!("loading '{name}' failed: {e:#}")).into_response(),
        Err(e) => ServeError::Internal(format!("loading '{name}': {e}")).into_response(),
    }
}

async fn repository_unload(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    if let Err(e) = control_allowed(&state) {
        return e.into_response();
    }
    match state.repo.unload(&name) {
        Ok(()) => Json(json!({ "name": name, "unloaded": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

async fn embeddings_endpoint(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let body = body.map_err(|e| body_error(e, state.config.max_body_bytes))?;
        embeddings::handle(&state, &body).await
    };
    match run.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
