use crate::cpu::CpuTier;
use thiserror::Error;

/// Errors from kernel entry points: bad shapes or buffers, or a tier the host cannot run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KernelError {
    /// A dimension, leading dimension or buffer length is inconsistent.
    #[error("{kernel}: {msg}")]
    Shape { kernel: &'static str, msg: String },
    /// An epilogue argument is invalid (e.g. a bias of the wrong length).
    #[error("{kernel} epilogue: {msg}")]
    Epilogue { kernel: &'static str, msg: String },
    /// The requested tier needs CPU features this host lacks.
    #[error("CPU tier {requested} is not supported on this host (best is {detected})")]
    TierUnsupported { requested: CpuTier, detected: CpuTier },
}

impl KernelError {
    pub(crate) fn shape(kernel: &'static str, msg: impl Into<String>) -> Self {
        KernelError::Shape { kernel, msg: msg.into() }
    }

    pub(crate) fn epilogue(kernel: &'static str, msg: impl Into<String>) -> Self {
        KernelError::Epilogue { kernel, msg: msg.into() }
    }
}

/// Checks that `tier` can run here.
pub(crate) fn check_tier(tier: CpuTier) -> Result<(), KernelError> {
    if tier.is_supported() {
        Ok(())
    } else {
        Err(KernelError::TierUnsupported { requested: tier, detected: crate::cpu::detected_tier() })
    }
}
