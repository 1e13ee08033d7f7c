//! lfm's integration tests, in one binary (each test binary re-monomorphises Burn, so one keeps CI fast).

mod autoencoder;
mod builtin;
mod checkpoint;
mod cli;
mod commands;
mod common;
mod cpu_grad;
#[cfg(feature = "cuda")]
mod cuda;
mod datasets;
mod dit;
mod edm;
mod fid;
mod flow;
mod kernels;
mod mixed;
mod model_config;
#[cfg(feature = "mpi")]
mod mpi;
mod sample;
mod solver;
mod tasks;
mod train;
mod train_autoencoder;
mod unet;
