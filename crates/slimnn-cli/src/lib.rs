//! The `slimnn` command-line tool's commands, as a library so tests can call them.

pub mod bench;
pub mod classify;
pub mod llm;
pub mod model;
pub mod quantize;
pub mod tasks;
pub mod train;
