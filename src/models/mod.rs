//! The velocity networks LFM trains: DiT, the guided-diffusion UNet and EDM's DhariwalUNet.

pub mod dit;

pub use dit::{DiT, DiTConfig};
