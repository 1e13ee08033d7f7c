//! `lfm-kernels`: the numerical pieces shared by lfm's generic solver code and its CubeCL kernels.
//!
//! Today this crate holds the Dormand–Prince tableau ([`tableau`]), the one copy that both the tensor-expression
//! solver in `lfm::solver` and the fused RK kernels read. The CubeCL kernels themselves (fused attention, fused RK
//! stage combination and dopri5 step) are tracked by the custom-kernels issue and will live here, each with a
//! plain-Burn fallback that is also its test oracle.

pub mod tableau;
