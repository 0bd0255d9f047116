//! Helpers shared by the tests of this workspace: dtype rounding and encoding, and the error metric.

use crate::FloatDType;
use half::{bf16, f16};

/// Relative RMSE `‖out − ref‖ / ‖ref‖` (FLA's `assert_close` metric); NaN anywhere gives NaN.
/// With an all-zero reference it returns the plain RMS of `out`.
pub fn rel_rmse(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "rel_rmse: length mismatch");
    let mut err = 0.0;
    let mut norm = 0.0;
    for (&o, &r) in out.iter().zip(reference) {
        if o.is_nan() || r.is_nan() {
            return f64::NAN;
        }
        err += (o - r) * (o - r);
        norm += r * r;
    }
    if norm == 0.0 {
        (err / out.len().max(1) as f64).sqrt()
    } else {
        (err / norm).sqrt()
    }
}

/// Rounds a value to what the dtype can hold, so references see exactly the kernel's inputs.
pub fn round_to(dtype: FloatDType, x: f64) -> f64 {
    match dtype {
        FloatDType::F32 => x as f32 as f64,
        FloatDType::F16 => f16::from_f64(x).to_f64(),
        FloatDType::BF16 => bf16::from_f64(x).to_f64(),
    }
}

/// Little-endian bytes of `xs` in `dtype`.
pub fn encode(dtype: FloatDType, xs: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * dtype.size());
    for &x in xs {
        match dtype {
            FloatDType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
            FloatDType::F16 => out.extend_from_slice(&f16::from_f64(x).to_bits().to_le_bytes()),
            FloatDType::BF16 => out.extend_from_slice(&bf16::from_f64(x).to_bits().to_le_bytes()),
        }
    }
    out
}

/// Values of little-endian `bytes` in `dtype`.
pub fn decode(dtype: FloatDType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        FloatDType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        FloatDType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
        FloatDType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
    }
}
