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

use crate::gated::naive::{self, NaiveForward, NaiveGrads, NaiveInputs};
use crate::gated::{GateKind, GatedProblem};

/// SplitMix64: a small seeded generator, so test data needs no dependency and is reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn normals(&mut self, n: usize, dtype: FloatDType) -> Vec<f64> {
        (0..n).map(|_| round_to(dtype, self.normal())).collect()
    }

    /// FLA's gate initialisation, `logsigmoid(randn)`, scaled by `strength`.
    pub fn log_gates(&mut self, n: usize, strength: f64, dtype: FloatDType) -> Vec<f64> {
        (0..n)
            .map(|_| round_to(dtype, -strength * (-self.normal()).exp().ln_1p()))
            .collect()
    }
}

/// Random inputs and output gradients for one gated problem, rounded to its dtype, with the
/// f64 reference beside them. `h0` exists when the problem has an initial state, `d_ht` when it
/// outputs a final state.
#[derive(Debug, Clone)]
pub struct GatedCase {
    pub p: GatedProblem,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub g: Option<Vec<f64>>,
    pub gv: Option<Vec<f64>>,
    pub h0: Option<Vec<f64>>,
    pub d_o: Vec<f64>,
    pub d_ht: Option<Vec<f64>>,
}

impl GatedCase {
    /// Draws a case; `strength` scales the log gates (0.1 weak, 1 FLA's default, 10 strong).
    pub fn new(p: GatedProblem, strength: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let dt = p.dtype;
        let (qk, vo) = p.lens();
        let q = rng.normals(qk, dt);
        let k = rng.normals(qk, dt);
        let v = rng.normals(vo, dt);
        let g = (p.gate != GateKind::None).then(|| rng.log_gates(p.gate_len(), strength, dt));
        let gv = p.value_gate.then(|| rng.log_gates(vo, strength, dt));
        let h0 = p
            .has_initial_state
            .then(|| rng.normals(p.state_len(), FloatDType::F32));
        let d_o = rng.normals(vo, dt);
        let d_ht = p
            .output_final_state
            .then(|| rng.normals(p.state_len(), FloatDType::F32));
        GatedCase {
            p,
            q,
            k,
            v,
            g,
            gv,
            h0,
            d_o,
            d_ht,
        }
    }

    pub fn inputs(&self) -> NaiveInputs<'_> {
        NaiveInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            g: self.g.as_deref(),
            gv: self.gv.as_deref(),
            h0: self.h0.as_deref(),
        }
    }

    /// The f64 reference: forward outputs, and gradients for `d_o` and `d_ht`.
    pub fn reference(&self) -> (NaiveForward, NaiveGrads) {
        let x = self.inputs();
        (
            naive::forward(&self.p, &x),
            naive::backward(&self.p, &x, &self.d_o, self.d_ht.as_deref()),
        )
    }
}

/// A problem description with FLA's default scale `K^-0.5`.
#[allow(clippy::too_many_arguments)]
pub fn problem(
    gate: GateKind,
    value_gate: bool,
    [batch, seq_len, heads, k_dim, v_dim]: [usize; 5],
    reverse: bool,
    cu_seqlens: Option<Vec<usize>>,
    states: bool,
    dtype: FloatDType,
) -> GatedProblem {
    GatedProblem {
        batch,
        seq_len,
        heads,
        k_dim,
        v_dim,
        gate,
        value_gate,
        scale: (k_dim as f32).powf(-0.5),
        reverse,
        cu_seqlens,
        has_initial_state: states,
        output_final_state: states,
        dtype,
    }
}

use crate::delta::naive::{self as delta_naive, DeltaForward, DeltaGrads, DeltaInputs};
use crate::delta::DeltaProblem;

/// Random inputs and output gradients for one delta-rule problem, rounded to its dtype. Keys are
/// L2-normalised per token (as DeltaNet layers do, and FLA's tests): with `β ∈ (0, 1)` the
/// transition `I − β kᵀk` then never grows the state.
#[derive(Debug, Clone)]
pub struct DeltaCase {
    pub p: DeltaProblem,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub beta: Vec<f64>,
    pub g: Option<Vec<f64>>,
    pub h0: Option<Vec<f64>>,
    pub d_o: Vec<f64>,
    pub d_ht: Option<Vec<f64>>,
}

/// Each `width`-long row of `xs` divided by its L2 norm, then rounded to `dtype`.
pub fn l2_rows(xs: &[f64], width: usize, dtype: FloatDType) -> Vec<f64> {
    xs.chunks(width)
        .flat_map(|row| {
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-6);
            row.iter().map(move |x| round_to(dtype, x / norm))
        })
        .collect()
}

impl DeltaCase {
    /// Draws a case; `strength` scales the log decays of a gated problem (as [`GatedCase::new`]).
    pub fn new(p: DeltaProblem, strength: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let dt = p.dtype;
        let (qk, vo, sc) = p.lens();
        let q = rng.normals(qk, dt);
        let k = l2_rows(&rng.normals(qk, FloatDType::F32), p.k_dim, dt);
        let v = rng.normals(vo, dt);
        let beta = (0..sc)
            .map(|_| round_to(dt, 1.0 / (1.0 + (-rng.normal()).exp())))
            .collect();
        let g = p.gated.then(|| rng.log_gates(sc, strength, dt));
        let h0 = p
            .has_initial_state
            .then(|| rng.normals(p.state_len(), FloatDType::F32));
        let d_o = rng.normals(vo, dt);
        let d_ht = p
            .output_final_state
            .then(|| rng.normals(p.state_len(), FloatDType::F32));
        DeltaCase {
            p,
            q,
            k,
            v,
            beta,
            g,
            h0,
            d_o,
            d_ht,
        }
    }

    pub fn inputs(&self) -> DeltaInputs<'_> {
        DeltaInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            beta: &self.beta,
            g: self.g.as_deref(),
            h0: self.h0.as_deref(),
        }
    }

    /// The f64 reference: forward outputs, and gradients for `d_o` and `d_ht`.
    pub fn reference(&self) -> (DeltaForward, DeltaGrads) {
        let x = self.inputs();
        (
            delta_naive::forward(&self.p, &x),
            delta_naive::backward(&self.p, &x, &self.d_o, self.d_ht.as_deref()),
        )
    }
}

use crate::attn::naive::{self as attn_naive, AttnForward, AttnGrads};
use crate::attn::AttnProblem;

/// Random `q, k, v` and `d_o` for one attention problem, rounded to its dtype.
#[derive(Debug, Clone)]
pub struct AttnCase {
    pub p: AttnProblem,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub d_o: Vec<f64>,
}

impl AttnCase {
    /// Draws a case; `spread` scales `q` and `k` (1: scores of unit variance; larger values make
    /// peaked softmax rows, where the running maximum matters).
    pub fn new(p: AttnProblem, spread: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let dt = p.dtype;
        let (nq, nk, nv, no, _) = p.lens();
        let mut scaled = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| round_to(dt, spread * rng.normal()))
                .collect()
        };
        let q = scaled(nq);
        let k = scaled(nk);
        let v = rng.normals(nv, dt);
        let d_o = rng.normals(no, dt);
        AttnCase { p, q, k, v, d_o }
    }

    pub fn reference(&self) -> (AttnForward, AttnGrads) {
        (
            attn_naive::forward(&self.p, &self.q, &self.k, &self.v),
            attn_naive::backward(&self.p, &self.q, &self.k, &self.v, &self.d_o),
        )
    }
}

use crate::norm::naive::{self as norm_naive, NormForward, NormGrads};
use crate::norm::NormProblem;

/// Random `x`, weight `w`, gate `g` (empty ungated) and `dy` for one norm problem, rounded to
/// its dtype.
#[derive(Debug, Clone)]
pub struct NormCase {
    pub p: NormProblem,
    pub x: Vec<f64>,
    pub w: Vec<f64>,
    pub g: Vec<f64>,
    pub dy: Vec<f64>,
}

impl NormCase {
    /// Draws a case; `spread` scales `x` (the norm is scale-free but for `ε`: small rows test
    /// it) and the gate (large gates reach swish's saturated ends).
    pub fn new(p: NormProblem, spread: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let dt = p.dtype;
        let n = p.len();
        let mut scaled = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| round_to(dt, spread * rng.normal()))
                .collect()
        };
        let x = scaled(n);
        let g = if p.gated { scaled(n) } else { Vec::new() };
        // Weights near one, as trained norms' are.
        let w = (0..p.dim)
            .map(|_| round_to(dt, 1.0 + 0.5 * rng.normal()))
            .collect();
        let dy = rng.normals(n, dt);
        NormCase { p, x, w, g, dy }
    }

    pub fn reference(&self) -> (NormForward, NormGrads) {
        (
            norm_naive::forward(&self.p, &self.x, &self.w, &self.g),
            norm_naive::backward(&self.p, &self.x, &self.w, &self.g, &self.dy),
        )
    }
}

use crate::adamw::{AdamWStep, GradClip};

/// The AdamW step the kernel and op tests take: a learning rate large enough that the update
/// stands out of the parameter's rounding, decay on, betas shorter than the defaults so that
/// later steps' bias corrections differ from the first's.
pub fn adamw_step(time: usize, clip: Option<GradClip>) -> AdamWStep {
    AdamWStep {
        lr: 0.05,
        beta_1: 0.9,
        beta_2: 0.95,
        epsilon: 1e-8,
        weight_decay: 0.1,
        cautious_weight_decay: false,
        clip,
        time,
    }
}
