//! # lfm — latent flow matching in Rust
//!
//! A re-implementation of "Flow Matching in Latent Space" (Dao et al., 2023) on Burn: the LFM probability path
//! ([`flow`]), torchdiffeq-exact ODE solvers ([`solver`]), the velocity networks ([`models`]) loading LFM's released
//! PyTorch checkpoints ([`checkpoint`]), and backend selection for CPU, wgpu and CUDA ([`backend`]).
//!
//! Data flows one way: files → tensors → velocity field → solver → autoencoder → images. Each stage is a module
//! that knows nothing of its neighbours except their types.

#![warn(missing_docs)]

pub mod autoencoder;
pub mod backend;
pub mod bench;
pub mod builtin;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod flow;
pub mod image;
pub mod io;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod noise;
pub mod sample;
pub mod solver;
pub mod tasks;
pub mod train;
