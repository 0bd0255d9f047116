use thiserror::Error;

/// What a kernel launcher refuses, before anything reaches the device.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KernelError {
    #[error("dtype {dtype} is not computable on this device ({runtime})")]
    UnsupportedDType {
        dtype: &'static str,
        runtime: &'static str,
    },
    #[error("invalid problem: {0}")]
    InvalidProblem(String),
    #[error("device limit: {0}")]
    DeviceLimit(String),
    /// A buffer handed to a launcher is shorter than the problem's extents: the kernels index by
    /// the problem (they are launched unchecked), so it is refused rather than read or written
    /// past its end.
    #[error("buffer too small: {0}")]
    Buffer(String),
    /// A vendor library the call went through (cuBLASLt) failed or could not be loaded.
    #[error("library: {0}")]
    Library(String),
}
