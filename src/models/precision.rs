//! Reduced-precision inference: a network's weights stored and multiplied in f16 or bf16.
//!
//! The solver keeps its state in f32 (the step controller and the error ratio need it); only the network runs in
//! the reduced format. Its input is cast on the way in and its output back to f32 on the way out. What loses too
//! much in 16 bits stays in f32: the sinusoidal time embedding (as the reference computes it), the statistics of
//! every LayerNorm/GroupNorm, and the softmax sums of the fused attention kernel (used whenever the backend has
//! it; the plain fallback's softmax runs in the input's dtype).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::Backend, DType, Tensor};

/// The floating-point format of a network's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit IEEE floats: the reference's precision, supported everywhere.
    #[default]
    F32,
    /// 16-bit IEEE half floats (GPUs with shader-f16; CUDA).
    F16,
    /// bfloat16 (CUDA; WGSL has no bf16).
    Bf16,
}

impl Precision {
    /// The tensor dtype of this format.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The format's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// Whether backend `B` computes in this format on `device`, with the fix when it does not.
    pub fn check_supported<B: Backend>(self, device: &B::Device) -> Result<(), String> {
        if self == Self::F32 || B::supports_dtype(device, self.dtype()) {
            return Ok(());
        }
        let hint = match self {
            Self::Bf16 => "bf16 needs the cuda backend (WGSL has no bf16; the cpu backend computes in f32 only)",
            _ => "f16 needs a GPU backend whose device supports 16-bit floats (wgpu with shader-f16, or cuda)",
        };
        Err(format!("--precision {} is not supported on this device: {hint}; use --precision f32", self.name()))
    }
}

/// Casts every float parameter of a module.
struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| {
            if t.dtype() == dtype {
                return t;
            }
            // A new leaf: under autodiff the cast parameter is trained itself, not through the cast.
            let trainable = t.is_require_grad();
            let cast = t.cast(dtype).detach();
            if trainable {
                cast.require_grad()
            } else {
                cast
            }
        })
    }
}

/// `module` with every float parameter cast to `dtype` (parameters already in that format are left alone); cast
/// trainable parameters stay trainable, as leaves of their own.
pub fn cast_module<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    module.map(&mut CastParams(dtype))
}
