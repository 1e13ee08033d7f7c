//! Evaluation metrics: the Fréchet distance between Gaussian feature statistics (pytorch-fid's formula).

pub mod fid;
