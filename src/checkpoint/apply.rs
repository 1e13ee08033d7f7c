//! Moving weights between host tensor maps and Burn modules, by the modules' own field paths.
//!
//! Model structs name their fields after the reference's attributes, so a Burn path such as
//! `blocks.0.attn.qkv.weight` is already the PyTorch key; the few names Rust cannot spell (`mlp.0`,
//! `adaLN_modulation.1`) go through a per-model [`KeyMap`]. Burn stores `Linear` weights as `[in, out]`, PyTorch as
//! `[out, in]`: the transpose happens here and nowhere else.

use std::collections::BTreeSet;
use std::fmt;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};

use super::{CheckpointError, HostTensor, TensorMap};

/// How a model's Burn field paths map to its checkpoint keys.
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    /// Renames of whole dot-separated segment runs, applied in order, e.g. `("mlp_0", "mlp.0")` or, for a
    /// `ModuleDict`, `("enc.0", "enc.8x8_conv")`.
    pub renames: Vec<(String, String)>,
    /// Checkpoint keys (suffixes) the model computes itself and does not load, e.g. EDM's `resample_filter` buffers.
    pub ignored_suffixes: Vec<String>,
}

impl KeyMap {
    /// A map with the given renames and nothing ignored.
    pub fn new(renames: &[(&str, &str)]) -> Self {
        Self { renames: renames.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(), ..Self::default() }
    }

    /// Adds one rename.
    pub fn rename(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.renames.push((from.into(), to.into()));
        self
    }

    /// Adds checkpoint key suffixes to skip.
    pub fn ignoring(mut self, suffixes: &[&str]) -> Self {
        self.ignored_suffixes.extend(suffixes.iter().map(|s| s.to_string()));
        self
    }

    /// The checkpoint key of a Burn field path.
    pub fn key(&self, path: &str) -> String {
        let mut padded = format!(".{path}.");
        for (from, to) in &self.renames {
            padded = padded.replace(&format!(".{from}."), &format!(".{to}."));
        }
        padded.trim_matches('.').to_string()
    }

    /// Whether a checkpoint key is one the model does not load.
    pub fn ignored(&self, key: &str) -> bool {
        self.ignored_suffixes.iter().any(|s| key.ends_with(s.as_str()))
    }
}

/// What went wrong when applying weights to a model.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Keys the model needs that the file lacks.
    pub missing: Vec<String>,
    /// Keys in the file the model does not use.
    pub unexpected: Vec<String>,
    /// Keys present in both with different shapes: (key, file shape, model shape).
    pub shape_mismatches: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Number of tensors applied.
    pub applied: usize,
}

impl LoadReport {
    /// Whether every key matched.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.shape_mismatches.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 12;
        let list = |f: &mut fmt::Formatter<'_>, title: &str, keys: &[String]| -> fmt::Result {
            if keys.is_empty() {
                return Ok(());
            }
            writeln!(f, "  {title} ({}):", keys.len())?;
            for k in keys.iter().take(SHOWN) {
                writeln!(f, "    {k}")?;
            }
            if keys.len() > SHOWN {
                writeln!(f, "    … and {} more", keys.len() - SHOWN)?;
            }
            Ok(())
        };
        list(f, "missing from the file", &self.missing)?;
        list(f, "in the file but not in the model", &self.unexpected)?;
        if !self.shape_mismatches.is_empty() {
            writeln!(f, "  shape mismatches ({}):", self.shape_mismatches.len())?;
            for (k, file, model) in self.shape_mismatches.iter().take(SHOWN) {
                writeln!(f, "    {k}: file {file:?}, model {model:?}")?;
            }
        }
        match recognise(&self.unexpected).filter(|_| self.applied == 0) {
            Some(kind) => write!(
                f,
                "  The file holds {}, not the network being loaded: check which file went to which flag \
                 (--checkpoint: the velocity network; --weights: the autoencoder; --inception: the FID network)",
                kind.name
            ),
            None => write!(
                f,
                "  The architecture does not describe this checkpoint: for a velocity network check model_type, nf, \
                 ch_mult, attn_resolutions, num_res_blocks, num_classes and the channel counts (or let lfm infer \
                 them); for an autoencoder, its config.json (--vae-config)"
            ),
        }
    }
}

/// A kind of network recognised from a file's keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NetworkKind {
    /// What the file holds, as a phrase ("a DiT velocity network").
    pub name: &'static str,
    /// Whether it is a velocity network (what `--checkpoint` takes).
    pub velocity: bool,
}

/// What kind of network a file's keys belong to, from their tell-tale prefixes, for files passed to the wrong flag;
/// the first kind in this table's order any key fits.
pub(crate) fn recognise<'a, I>(keys: I) -> Option<NetworkKind>
where
    I: IntoIterator<Item = &'a String>,
    I::IntoIter: Clone,
{
    const KINDS: [(&[&str], &str, bool); 6] = [
        (&["x_embedder.", "t_embedder."], "a DiT velocity network", true),
        (&["input_blocks.", "time_embed."], "a guided-diffusion UNet velocity network", true),
        (&["map_layer0.", "enc."], "an EDM UNet velocity network", true),
        (
            &["encoder.down_blocks.", "decoder.up_blocks.", "quant_conv."],
            "a KL autoencoder (diffusers AutoencoderKL)",
            false,
        ),
        (&["encoder.layers.", "decoder.layers."], "a TAESD autoencoder", false),
        (&["Conv2d_1a_3x3.", "Mixed_5b."], "the FID Inception network", false),
    ];
    let keys = keys.into_iter();
    let has = |prefix: &str| keys.clone().any(|k| k.strip_prefix("module.").unwrap_or(k).starts_with(prefix));
    KINDS
        .iter()
        .find(|(prefixes, ..)| prefixes.iter().any(|p| has(p)))
        .map(|&(_, name, velocity)| NetworkKind { name, velocity })
}

/// Shape of a parameter as PyTorch stores it.
fn torch_shape(burn_shape: &[usize], linear_weight: bool) -> Vec<usize> {
    if linear_weight {
        burn_shape.iter().rev().copied().collect()
    } else {
        burn_shape.to_vec()
    }
}

/// The module path a visitor or mapper is at, and whether the parameter there is a `Linear` weight.
#[derive(Default)]
struct ModulePath {
    names: Vec<String>,
    containers: Vec<String>,
}

impl ModulePath {
    fn enter(&mut self, name: &str, container_type: &str) {
        // An enum module enters its variant by name; PyTorch has no such level, so it is left out of the key.
        let name = if container_type.starts_with("Enum:") { "" } else { name };
        self.names.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit(&mut self) {
        self.names.pop();
        self.containers.pop();
    }

    /// The checkpoint key of the current path.
    fn key(&self, keys: &KeyMap) -> String {
        let path: Vec<&str> = self.names.iter().map(String::as_str).filter(|n| !n.is_empty()).collect();
        keys.key(&path.join("."))
    }

    /// Burn keeps `Linear` weights as `[in, out]`, PyTorch as `[out, in]`.
    fn is_linear_weight(&self) -> bool {
        self.names.last().is_some_and(|n| n == "weight") && self.containers.last().is_some_and(|c| c == "Struct:Linear")
    }
}

struct Loader<'a> {
    map: &'a TensorMap,
    keys: &'a KeyMap,
    path: ModulePath,
    used: BTreeSet<String>,
    report: LoadReport,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (key, linear_weight) = (self.path.key(self.keys), self.path.is_linear_weight());
        let (id, tensor, mapper) = param.consume();
        let model_shape = torch_shape(&tensor.dims(), linear_weight);
        let Some(host) = self.map.get(&key) else {
            self.report.missing.push(key);
            return Param::from_mapped_value(id, tensor, mapper);
        };
        self.used.insert(key.clone());
        if host.shape != model_shape {
            self.report.shape_mismatches.push((key, host.shape.clone(), model_shape));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let require_grad = tensor.is_require_grad();
        let loaded: Tensor<B, D> = host.to_tensor(&tensor.device());
        let loaded = if linear_weight { loaded.transpose() } else { loaded };
        self.report.applied += 1;
        let loaded = if require_grad { loaded.require_grad() } else { loaded };
        Param::from_mapped_value(id, loaded, mapper)
    }
}

/// Applies named host tensors to a module. Every parameter must be found with the right shape and every key must
/// be used (apart from [`KeyMap::ignored_suffixes`]); otherwise nothing is returned but a precise report.
pub fn apply_weights<B: Backend, M: Module<B>>(
    module: M,
    map: &TensorMap,
    keys: &KeyMap,
) -> Result<M, CheckpointError> {
    let mut loader =
        Loader { map, keys, path: ModulePath::default(), used: BTreeSet::new(), report: LoadReport::default() };
    let module = module.map(&mut loader);
    let mut report = loader.report;
    report.unexpected = map.keys().filter(|k| !loader.used.contains(*k) && !keys.ignored(k)).cloned().collect();
    if report.is_clean() {
        Ok(module)
    } else {
        Err(CheckpointError::Mismatch(report))
    }
}

struct Collector<'a> {
    keys: &'a KeyMap,
    path: ModulePath,
    map: TensorMap,
}

impl<B: Backend> ModuleVisitor<B> for Collector<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        let tensor = if self.path.is_linear_weight() { tensor.transpose() } else { tensor };
        let shape = tensor.dims().to_vec();
        let values = tensor.into_data().convert::<f32>().into_vec::<f32>().expect("float tensor data");
        self.map.insert(self.path.key(self.keys), HostTensor::f32(shape, values));
    }
}

struct GradCollector<'a, B: burn::tensor::backend::AutodiffBackend> {
    keys: &'a KeyMap,
    path: ModulePath,
    grads: &'a B::Gradients,
    map: TensorMap,
}

impl<B: burn::tensor::backend::AutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = param.val().grad(self.grads) else { return };
        let grad = if self.path.is_linear_weight() { grad.transpose() } else { grad };
        let shape = grad.dims().to_vec();
        let values = grad.into_data().convert::<f32>().into_vec::<f32>().expect("float tensor data");
        self.map.insert(self.path.key(self.keys), HostTensor::f32(shape, values));
    }
}

/// The gradient of every parameter that has one, under its checkpoint key, in PyTorch layout.
pub fn collect_grads<B: burn::tensor::backend::AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &B::Gradients,
    keys: &KeyMap,
) -> TensorMap {
    let mut collector = GradCollector { keys, path: ModulePath::default(), grads, map: TensorMap::new() };
    module.visit(&mut collector);
    collector.map
}

/// Every float parameter of a module, under its checkpoint key, in PyTorch layout.
pub fn collect_weights<B: Backend, M: Module<B>>(module: &M, keys: &KeyMap) -> TensorMap {
    let mut collector = Collector { keys, path: ModulePath::default(), map: TensorMap::new() };
    module.visit(&mut collector);
    collector.map
}
