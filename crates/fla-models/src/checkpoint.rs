//! FLA / Hugging Face checkpoints: `model.safetensors` with FLA's parameter names and PyTorch's
//! layouts, read and written through burn-store.
//!
//! The module tree of [`crate::lm::ForCausalLM`] already follows FLA's (`model.layers.N.attn.
//! q_proj`, ...). What differs is bridged here, in both directions: PyTorch stores a linear
//! weight `[out, in]` where Burn keeps `[in, out]` (burn-store's PyTorch adapters transpose
//! them); Burn's `RmsNorm` names its weight `gamma`; our gated norms wrap an `RmsNorm`
//! (`o_norm.norm.gamma` for FLA's `o_norm.weight`); Rust fields cannot hold FLA's `gk_proj.0`
//! (a `Sequential`) or `A_log` (not snake case).
//!
//! Tensors load in the backend's float type whatever the file's dtype, converted on the host:
//! FLA's checkpoints are mostly bf16, which neither lavapipe nor NdArray can hold, and a model
//! whose parameters are not in its backend's float type computes in a precision nobody asked for
//! (an f32 run on bf16 weights, or a bf16 backend on f32 ones).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use std::rc::Rc;

use burn::tensor::{DType, Element};
use burn_store::{
    ApplyError, BurnToPyTorchAdapter, KeyRemapper, ModuleAdapter, ModuleSnapshot,
    PyTorchToBurnAdapter, SafetensorsStore, TensorSnapshot,
};
use fla_burn::FlaError;

use crate::lm::ConfigError;

/// FLA's names → ours, applied in order.
const FROM_FLA: [(&str, &str); 4] = [
    (
        r"^(.*\.)?(attn_norm|mlp_norm|norm|q_norm|k_norm)\.weight$",
        "${1}${2}.gamma",
    ),
    (
        r"\.(g_norm_swish_gate|o_norm|g_norm)\.weight$",
        ".${1}.norm.gamma",
    ),
    (r"\.gk_proj\.([0-9]+)\.", ".gk_proj_${1}."),
    (r"\.A_log$", ".a_log"),
];

/// Ours → FLA's names, applied in order (the gated norms first: their `norm.gamma` would
/// otherwise match the plain norms' rule).
const TO_FLA: [(&str, &str); 4] = [
    (
        r"\.(g_norm_swish_gate|o_norm|g_norm)\.norm\.gamma$",
        ".${1}.weight",
    ),
    (
        r"^(.*\.)?(attn_norm|mlp_norm|norm|q_norm|k_norm)\.gamma$",
        "${1}${2}.weight",
    ),
    (r"\.gk_proj_([0-9]+)\.", ".gk_proj.${1}."),
    (r"\.a_log$", ".A_log"),
];

fn remapper(rules: &[(&str, &str)]) -> KeyRemapper {
    rules.iter().fold(KeyRemapper::new(), |r, (from, to)| {
        r.add_pattern(*from, *to)
            .expect("the name rules are valid regexes")
    })
}

/// Applies the rules to one name (for naming tensors in errors as the file names them).
fn rename(rules: &[(&str, &str)], name: &str) -> String {
    rules.iter().fold(name.to_string(), |n, (from, to)| {
        regex::Regex::new(from)
            .expect("the name rules are valid regexes")
            .replace_all(&n, *to)
            .into_owned()
    })
}

/// FLA's name of one of our parameters (`model.layers.0.attn.o_norm.norm.gamma` →
/// `model.layers.0.attn.o_norm.weight`).
pub fn fla_name(ours: &str) -> String {
    rename(&TO_FLA, ours)
}

/// Why a checkpoint could not be read or written. Tensor names are FLA's, as in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointError {
    /// The file could not be opened, parsed or written.
    Io(PathBuf, String),
    /// Tensors the model needs that the file lacks.
    Missing(PathBuf, Vec<String>),
    /// Tensors in the file that the model has no place for (a different architecture or an
    /// option this port does not build).
    Unexpected(PathBuf, Vec<String>),
    /// A tensor whose shape is not the model's (`expected`/`found` in the file's layout).
    Shape {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Any other tensor that would not load (dtype, data).
    Tensor(PathBuf, String, String),
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(p, e) => write!(f, "{}: {e}", p.display()),
            Self::Missing(p, n) => write!(f, "{} lacks tensors: {}", p.display(), n.join(", ")),
            Self::Unexpected(p, n) => write!(
                f,
                "{} has tensors this model does not use: {}",
                p.display(),
                n.join(", ")
            ),
            Self::Shape {
                file,
                name,
                expected,
                found,
            } => write!(
                f,
                "{}: tensor {name} has shape {found:?}, the model expects {expected:?}",
                file.display()
            ),
            Self::Tensor(p, n, e) => write!(f, "{}: tensor {n}: {e}", p.display()),
        }
    }
}

impl std::error::Error for CheckpointError {}

/// PyTorch's layout of a tensor of ours (a Burn linear weight `[in, out]` is `[out, in]` there).
fn torch_shape(ours: &str, shape: &[usize]) -> Vec<usize> {
    let linear = ours.ends_with(".weight")
        && shape.len() == 2
        && !ours.ends_with("embeddings.weight")
        && !ours.contains("conv1d");
    if linear {
        vec![shape[1], shape[0]]
    } else {
        shape.to_vec()
    }
}

/// Converts every float tensor read to one dtype (integer tensors stay as they are).
#[derive(Debug, Clone, Copy)]
struct FloatsAs(DType);

impl ModuleAdapter for FloatsAs {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        if snapshot.dtype == target || !snapshot.dtype.is_float() {
            return snapshot.clone();
        }
        let read = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(read()?.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// Loads FLA's `model.safetensors` into `module` (built from the matching config). Every
/// parameter must be in the file with its shape, and every tensor of the file must have a
/// place in the model, except `lm_head.weight` when the model ties it to the embeddings. Float
/// tensors are converted to the backend's float type.
pub fn load_safetensors<B: Backend, M: Module<B>>(
    module: &mut M,
    path: &Path,
) -> Result<(), CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::Io(path.into(), "no such file".into()));
    }
    let float = <B::FloatElem as Element>::dtype();
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter.chain(FloatsAs(float)))
        .remap(remapper(&FROM_FLA))
        // Hybrid layers are an enum of mixers; FLA's names do not name the variant.
        .skip_enum_variants(true)
        .allow_partial(true)
        .validate(false);
    let result = module
        .load_from(&mut store)
        .map_err(|e| CheckpointError::Io(path.into(), e.to_string()))?;
    if let Some(e) = result.errors.first() {
        return Err(match e {
            ApplyError::ShapeMismatch {
                path: p,
                expected,
                found,
            } => CheckpointError::Shape {
                file: path.into(),
                name: fla_name(p),
                expected: torch_shape(p, expected.as_ref()),
                found: torch_shape(p, found.as_ref()),
            },
            other => CheckpointError::Tensor(path.into(), String::new(), format!("{other:?}")),
        });
    }
    if !result.missing.is_empty() {
        let names = result.missing.iter().map(|(p, _)| fla_name(p)).collect();
        return Err(CheckpointError::Missing(path.into(), names));
    }
    let tied = !result.applied.iter().any(|p| p.starts_with("lm_head."));
    let unexpected: Vec<String> = result
        .unused
        .iter()
        .map(|p| fla_name(p))
        .filter(|p| !(tied && p == "lm_head.weight"))
        .collect();
    if !unexpected.is_empty() {
        return Err(CheckpointError::Unexpected(path.into(), unexpected));
    }
    Ok(())
}

/// Writes `module` as FLA's `model.safetensors` (replacing the file if there is one): FLA's
/// names, PyTorch's layouts, and the `format: pt` metadata that transformers expects.
pub fn save_safetensors<B: Backend, M: Module<B>>(
    module: &M,
    path: &Path,
) -> Result<(), CheckpointError> {
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .remap(remapper(&TO_FLA))
        .skip_enum_variants(true)
        .metadata("format", "pt")
        // As transformers' save_pretrained: a second save into a directory replaces the first.
        .overwrite(true);
    module
        .save_into(&mut store)
        .map_err(|e| CheckpointError::Io(path.into(), e.to_string()))
}

/// Why a pretrained model directory could not be loaded or saved.
#[derive(Debug, Clone, PartialEq)]
pub enum PretrainedError {
    Config(ConfigError),
    /// The config asks for something this port cannot build.
    Model(FlaError),
    Checkpoint(CheckpointError),
}

impl std::fmt::Display for PretrainedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::Model(e) => write!(f, "cannot build the model: {e}"),
            Self::Checkpoint(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PretrainedError {}

impl From<ConfigError> for PretrainedError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<FlaError> for PretrainedError {
    fn from(e: FlaError) -> Self {
        Self::Model(e)
    }
}

impl From<CheckpointError> for PretrainedError {
    fn from(e: CheckpointError) -> Self {
        Self::Checkpoint(e)
    }
}

/// A model family as a directory of FLA's files holds it (`config.json`, `model.safetensors`).
pub trait Pretrained<B: Backend>: Sized + Module<B> {
    type Config: serde::de::DeserializeOwned + serde::Serialize;
    /// The family's name in errors.
    const FAMILY: &'static str;

    fn build(config: &Self::Config, device: &B::Device) -> Result<Self, FlaError>;

    /// Reads `dir/config.json`, builds the model on `device` and loads `dir/model.safetensors`.
    fn from_pretrained(
        dir: impl AsRef<Path>,
        device: &B::Device,
    ) -> Result<(Self, Self::Config), PretrainedError> {
        let dir = dir.as_ref();
        let config: Self::Config = crate::lm::load_config(&dir.join("config.json"), Self::FAMILY)?;
        let mut model = Self::build(&config, device)?;
        load_safetensors(&mut model, &dir.join("model.safetensors"))?;
        Ok((model, config))
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` as FLA's `save_pretrained` does.
    fn save_pretrained(
        &self,
        config: &Self::Config,
        dir: impl AsRef<Path>,
    ) -> Result<(), PretrainedError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| ConfigError::Io(dir.display().to_string(), e.to_string()))?;
        crate::lm::save_config(config, &dir.join("config.json"))?;
        save_safetensors(self, &dir.join("model.safetensors"))?;
        Ok(())
    }
}
