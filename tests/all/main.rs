//! lfm's integration tests, in one binary (each test binary re-monomorphises Burn, so one keeps CI fast).

mod checkpoint;
mod cli;
mod commands;
mod common;
mod dit;
mod flow;
mod solver;
