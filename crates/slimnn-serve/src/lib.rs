//! slimnn's model server: the KServe v2 / Open Inference Protocol over REST (axum) and gRPC
//! (tonic), in front of [`slimnn_runtime::Runnable`]s with dynamic batching, bounded queues,
//! a model repository that loads and unloads while running, Prometheus metrics and structured
//! logs. See `doc/serving.md`.

pub mod batcher;
pub mod codec;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod repository;
pub mod server;

/// Messages and the service trait generated from `proto/grpc_predict_v2.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

pub use config::{ModelConfig, ServeArgs, ServerConfig};
pub use error::ServeError;
pub use server::{run, serve};
