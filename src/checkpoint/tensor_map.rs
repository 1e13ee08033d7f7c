//! Host-side tensors by name: what every checkpoint format is read into before it meets a model.

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// Values of a host tensor. Floating-point formats are widened to `f32`/`f64`, integers to `i64`.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// float32, float16 and bfloat16 values.
    F32(Vec<f32>),
    /// float64 values.
    F64(Vec<f64>),
    /// Integer and boolean values.
    I64(Vec<i64>),
}

/// A tensor held in host memory, in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: HostData,
    /// The dtype the file stored (e.g. `"F16"`), for reports.
    pub stored_dtype: String,
}

impl HostTensor {
    /// An `f32` tensor.
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Self {
        Self { shape, data: HostData::F32(values), stored_dtype: "F32".into() }
    }

    /// A float tensor read back from the device as `f32` (16-bit values widen exactly).
    pub fn from_tensor<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Self {
        let shape = tensor.dims().to_vec();
        Self::f32(shape, tensor.into_data().convert::<f32>().into_vec::<f32>().expect("f32 after the conversion"))
    }

    /// An `i64` tensor (labels).
    pub fn i64(shape: Vec<usize>, values: Vec<i64>) -> Self {
        Self { shape, data: HostData::I64(values), stored_dtype: "I64".into() }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as `f32` (integers and f64 are converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as `f64`.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            HostData::F64(v) => v.clone(),
            HostData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The values as `i64` (floats are truncated).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::F64(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::I64(v) => v.clone(),
        }
    }

    /// The tensor on a device as floats, in the device's default float dtype.
    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        let data = TensorData::new(self.to_f32(), self.shape.clone()).convert::<B::FloatElem>();
        Tensor::from_data(data, device)
    }

    /// The tensor on a device as integers.
    pub fn to_int_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D, Int> {
        let data = TensorData::new(self.to_i64(), self.shape.clone()).convert::<B::IntElem>();
        Tensor::from_data(data, device)
    }

    /// Whether the values are floating point.
    pub fn is_float(&self) -> bool {
        !matches!(self.data, HostData::I64(_))
    }
}

/// Named host tensors, sorted by name.
pub type TensorMap = BTreeMap<String, HostTensor>;

/// Strips the `module.` prefix that DDP-wrapped models (LFM's released checkpoints) put on every key, where
/// present; keys without it are kept as they are.
pub fn strip_module_prefix(map: TensorMap) -> TensorMap {
    map.into_iter()
        .map(|(k, v)| match k.strip_prefix("module.") {
            Some(stripped) => (stripped.to_string(), v),
            None => (k, v),
        })
        .collect()
}

/// Total number of elements of the floating-point tensors.
pub fn parameter_count(map: &TensorMap) -> usize {
    map.values().filter(|t| t.is_float()).map(HostTensor::numel).sum()
}
