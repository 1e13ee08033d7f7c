//! Custom CubeCL kernels for lfm.
