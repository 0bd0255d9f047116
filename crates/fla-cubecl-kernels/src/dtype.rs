//! Input dtypes the kernels compute in, and the device capability check behind them.

use cubecl::ir::features::TypeUsage;
use cubecl::ir::{FloatKind, StorageType};
use cubecl::prelude::*;

use crate::KernelError;

/// Floating-point dtype of a kernel's inputs and outputs. States and accumulators are always `f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatDType {
    F32,
    F16,
    BF16,
}

impl FloatDType {
    pub fn storage(self) -> StorageType {
        match self {
            FloatDType::F32 => FloatKind::F32.into(),
            FloatDType::F16 => FloatKind::F16.into(),
            FloatDType::BF16 => FloatKind::BF16.into(),
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatDType::F32 => 4,
            FloatDType::F16 | FloatDType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FloatDType::F32 => "f32",
            FloatDType::F16 => "f16",
            FloatDType::BF16 => "bf16",
        }
    }

    /// Checks that the device can store and compute in this dtype. A kernel that fails to compile
    /// poisons the device thread for the rest of the process, so this runs before every launch
    /// (bf16 on Vulkan is storage-only, for example).
    pub fn check_supported<R: Runtime>(self, client: &ComputeClient<R>) -> Result<(), KernelError> {
        let usage = client.properties().type_usage(self.storage());
        if usage.contains(TypeUsage::Arithmetic) && usage.contains(TypeUsage::Buffer) {
            Ok(())
        } else {
            Err(KernelError::UnsupportedDType {
                dtype: self.name(),
                runtime: R::name(client),
            })
        }
    }
}
