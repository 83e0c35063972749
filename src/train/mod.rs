//! Training: the experiment config, the model and optimiser, one run's loop with checkpoints,
//! and the comparison report.

pub mod config;
pub mod model;
pub mod report;
pub mod run;
