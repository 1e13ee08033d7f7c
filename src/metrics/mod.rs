//! Evaluation metrics: pytorch-fid's FID Inception features, feature statistics and the Fréchet distance, the
//! statistics files pytorch-fid and LFM write, and the inpainting scores P-IDS/U-IDS.

pub mod features;
pub mod fid;
pub mod inception;
pub mod stats_file;
