//! Errors a request can end in, with their REST status and gRPC code.

use axum::http::StatusCode;

#[derive(Debug, Clone)]
pub enum ServeError {
    /// The request is wrong (malformed, or does not match the model's signature).
    BadRequest(String),
    NotFound(String),
    PayloadTooLarge(String),
    /// The queue is full, the model is not ready, or the server is shutting down.
    Unavailable(String),
    Timeout(String),
    /// An endpoint that is switched off by configuration.
    Forbidden(String),
    Internal(String),
}

impl ServeError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ServeError::BadRequest(_) => tonic::Code::InvalidArgument,
            ServeError::NotFound(_) => tonic::Code::NotFound,
            ServeError::PayloadTooLarge(_) => tonic::Code::ResourceExhausted,
            ServeError::Unavailable(_) => tonic::Code::Unavailable,
            ServeError::Timeout(_) => tonic::Code::DeadlineExceeded,
            ServeError::Forbidden(_) => tonic::Code::PermissionDenied,
            ServeError::Internal(_) => tonic::Code::Internal,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ServeError::BadRequest(m)
            | ServeError::NotFound(m)
            | ServeError::PayloadTooLarge(m)
            | ServeError::Unavailable(m)
            | ServeError::Timeout(m)
            | ServeError::Forbidden(m)
            | ServeError::Internal(m) => m,
        }
    }
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for ServeError {}

impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> tonic::Status {
        tonic::Status::new(e.grpc_code(), e.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_and_grpc_codes_agree() {
        let full = ServeError::Unavailable("queue full".into());
        assert_eq!((full.status(), full.grpc_code()), (StatusCode::SERVICE_UNAVAILABLE, tonic::Code::Unavailable));
        let bad = ServeError::BadRequest("input 'x'".into());
        assert_eq!((bad.status(), bad.grpc_code()), (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument));
        let status = tonic::Status::from(ServeError::Timeout("slow".into()));
        assert_eq!((status.code(), status.message()), (tonic::Code::DeadlineExceeded, "slow"));
    }
}
