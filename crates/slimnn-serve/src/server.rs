//! Starting, running and stopping the server: both listeners, the model repository, logging,
//! and a graceful shutdown that finishes in-flight requests before exiting.

use crate::config::{ServeArgs, ServerConfig};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::model::LoadedModel;
use crate::repository::Repository;
use anyhow::{Context, Result};
use slimnn_tensor::Tensor;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Protocol extensions this server speaks.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "model_repository", "metrics"];

pub fn server_metadata_json() -> serde_json::Value {
    serde_json::json!({ "name": "slimnn", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS })
}

/// What every request handler shares.
pub struct AppState {
    pub config: Arc<ServerConfig>,
    pub repo: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
}

impl AppState {
    /// Ready once the models configured at start have been tried, until shutdown begins.
    pub fn ready(&self) -> bool {
        self.repo.startup_done() && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// Queues inputs on the model's batcher and waits for the result within the request timeout.
    pub async fn infer(&self, model: &LoadedModel, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, ServeError> {
        let rx = model.batcher.submit(inputs)?;
        let limit = Duration::from_millis(self.config.request_timeout_ms);
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => {
                Err(ServeError::Unavailable(format!("model '{}' stopped before answering", model.source.name)))
            }
            Err(_) => Err(ServeError::Timeout(format!(
                "model '{}': no result within the request timeout of {} ms",
                model.source.name, self.config.request_timeout_ms
            ))),
        }
    }
}

fn init_logging(json: bool) {
    let level = match std::env::var("SLIMNN_LOG").ok().as_deref() {
        Some("debug") => tracing::Level::DEBUG,
        Some("warn") => tracing::Level::WARN,
        Some("error") => tracing::Level::ERROR,
        Some("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    let builder = tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).with_ansi(false);
    // A second init (tests starting several servers in one process) is harmless.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// `slimnn serve`: runs until SIGINT/SIGTERM, then drains and returns.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let config = ServerConfig::from_args(args)?;
    init_logging(config.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(run(config, shutdown_signal()))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the server until `shutdown` completes.
pub async fn run(config: ServerConfig, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let repo = Arc::new(Repository::new(config.clone(), metrics.clone()));
    let state = Arc::new(AppState { config: config.clone(), repo: repo.clone(), metrics, shutting_down: false.into() });

    let http_addr = format!("{}:{}", config.host, config.http_port);
    let grpc_addr = format!("{}:{}", config.host, config.grpc_port);
    let http_listener =
        tokio::net::TcpListener::bind(&http_addr).await.with_context(|| format!("listening on {http_addr} (HTTP)"))?;
    let grpc_listener =
        tokio::net::TcpListener::bind(&grpc_addr).await.with_context(|| format!("listening on {grpc_addr} (gRPC)"))?;
    let http_local = http_listener.local_addr()?;
    let grpc_local = grpc_listener.local_addr()?;
    println!("slimnn serve: HTTP on http://{http_local}");
    println!("slimnn serve: gRPC on {grpc_local}");
    let _ = std::io::stdout().flush();
    tracing::info!(http = %http_local, grpc = %grpc_local, "listening");

    let loader = repo.clone();
    let loading = tokio::task::spawn_blocking(move || loader.load_all());

    let (stop_tx, stop_rx) = watch::channel(false);
    let signal_state = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        signal_state.shutting_down.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let app = crate::http::router(state.clone());
    let http = axum::serve(http_listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    let grpc_service =
        crate::proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(crate::grpc::GrpcService {
            state: state.clone(),
        })
        .max_decoding_message_size(config.max_body_bytes)
        .max_encoding_message_size(usize::MAX);
    let grpc = tonic::transport::Server::builder().add_service(grpc_service).serve_with_incoming_shutdown(
        tonic::transport::server::TcpIncoming::from(grpc_listener),
        stopped(stop_rx.clone()),
    );
    let (h, g) = tokio::join!(async { http.await }, grpc);
    h.context("HTTP server")?;
    g.context("gRPC server")?;

    let _ = loading.await;
    let models = repo.unload_all();
    tokio::task::spawn_blocking(move || {
        for m in &models {
            m.batcher.close();
        }
        for m in &models {
            m.batcher.join();
        }
    })
    .await
    .ok();
    tracing::info!("stopped");
    println!("slimnn serve: stopped");
    Ok(())
}
