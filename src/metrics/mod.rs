//! Evaluation metrics: pytorch-fid's FID Inception features, feature statistics and the Fréchet distance, and
//! the statistics files pytorch-fid and LFM write.

pub mod features;
pub mod fid;
pub mod inception;
pub mod stats_file;
