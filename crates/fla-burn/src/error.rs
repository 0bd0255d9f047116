use fla_cubecl_kernels::KernelError;
use thiserror::Error;

/// Why an op refused its inputs or its device. Nothing is launched when one is returned.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum FlaError {
    /// Tensor shapes disagree with each other or with the op's contract.
    #[error("shape error: {0}")]
    Shape(String),
    /// Tensor dtypes disagree, or one is not a float type the op takes.
    #[error("dtype error: {0}")]
    DType(String),
    /// The device cannot compute in this dtype (bf16 on Vulkan, f64 on the GPU kernels).
    #[error("dtype {dtype} is not supported on this device ({device})")]
    UnsupportedDType { dtype: String, device: String },
    /// `cu_seqlens` is not a valid list of sequence boundaries.
    #[error("invalid cu_seqlens: {0}")]
    CuSeqlens(String),
    /// A dimension is zero where the op needs at least one element.
    #[error("empty input: {0}")]
    Empty(String),
    /// No usable GPU driver or adapter for the requested runtime.
    #[error("no device: {0}")]
    NoDevice(String),
    /// An option that the op does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A limit of the kernels or the device.
    #[error("kernel: {0}")]
    Kernel(String),
}

impl From<KernelError> for FlaError {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::UnsupportedDType { dtype, runtime } => FlaError::UnsupportedDType {
                dtype: dtype.to_string(),
                device: runtime.to_string(),
            },
            KernelError::InvalidProblem(m) if m.contains("cu_seqlens") => FlaError::CuSeqlens(m),
            KernelError::InvalidProblem(m) if m.contains("zero") => FlaError::Empty(m),
            KernelError::InvalidProblem(m) => FlaError::Shape(m),
            KernelError::DeviceLimit(m) | KernelError::Library(m) | KernelError::Buffer(m) => {
                FlaError::Kernel(m)
            }
        }
    }
}
