//! llama-parity: proves a Llama port numerically faithful to HuggingFace transformers,
//! layer by layer, and says where and why it is not.
//!
//! The library is one crate a stage, in pipeline order (`harness/<stage>/`); each stage
//! depends only on the stages before it, so the compiler holds the order and
//! `cargo tree` shows it. This crate gathers them under one name:
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
//! 7. [`pipeline`]: a candidate opened by its layout, compared, diagnosed and reported in
//!    one call, as every command uses it; the suite's matrix and expectations.
//!
//! The `parity` binary (`harness/parity/`) is a thin layer over [`pipeline`]:
//! it parses flags into library options and maps library errors to exit codes.

pub use compare;
pub use contract;
pub use diagnosis;
pub use dump;
pub use model;
pub use pipeline;
pub use report;
pub use weights;

pub use contract::error::{Error, Result};
