//! llama-parity: proves a Llama port numerically faithful to HuggingFace transformers,
//! layer by layer, and says where and why it is not.
//!
//! The library is laid out in pipeline order, one folder a stage (`ls harness` reads
//! it); every stage uses only the stages before it:
//!
//! 0. [`contract`]: sites, steps and compute order, fault IDs, the error type;
//! 1. [`dump`]: the contract's dump format (manifest, activations, weights) and its loaders;
//! 2. [`weights`]: a port's checkpoints and key maps, and `check-weights`;
//! 3. [`model`]: implementations that run a golden's scenario and produce a dump
//!    (the float64 reference, the simulated Ascend port, the MindSpore runner);
//! 4. [`compare`]: aligns golden and candidate sites, measures them, judges each against
//!    the tolerance policy and reaches a verdict;
//! 5. [`diagnosis`]: names the known porting fault behind a divergence, by rerunning
//!    the model under each hypothesis;
//! 6. [`report`]: the verdict for people and CI (JSON, HTML, JUnit, Markdown, terminal);
//! 7. [`pipeline`]: compare, diagnose and report in one call, as every command uses it.
//!
//! The `parity` binary (`harness/bin/parity/`) is a thin layer over [`pipeline`]:
//! it parses flags into library options and maps library errors to exit codes.

#[path = "4-compare/mod.rs"]
pub mod compare;
#[path = "0-contract/mod.rs"]
pub mod contract;
#[path = "5-diagnosis/mod.rs"]
pub mod diagnosis;
#[path = "1-dump/mod.rs"]
pub mod dump;
#[path = "3-model/mod.rs"]
pub mod model;
#[path = "7-pipeline.rs"]
pub mod pipeline;
#[path = "6-report/mod.rs"]
pub mod report;
#[path = "2-weights/mod.rs"]
pub mod weights;

pub use contract::error::{Error, Result};
