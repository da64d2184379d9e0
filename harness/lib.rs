//! llama-parity: proves a Llama port numerically faithful to HuggingFace transformers,
//! layer by layer, and says where and why it is not.
//!
//! The pipeline, one module a stage:
//!
//! - [`dump`]: the contract's dump format (manifest, activations, weights) and its loaders;
//! - [`site`]: the names of activations and the order the model computes them in;
//! - [`metrics`]: per-site error measures, streamed in one pass;
//! - [`model`]: implementations that produce dumps (reference, ascend, mindspore);
//! - [`tolerance`]: the policy that turns metrics into pass or fail;
//! - [`compare`]: aligns golden and candidate sites and reaches a verdict;
//! - [`diagnosis`]: names the known porting fault behind a divergence;
//! - [`report`]: the verdict as JSON (and more) for people and CI.
//!
//! Beside it, for a port's weights: [`ckpt`] reads MindSpore checkpoints, [`keymap`]
//! maps HF parameter names to a port's, and [`weight_check`] checks a converted
//! checkpoint against the HF weights.

pub mod ckpt;
pub mod compare;
pub mod diagnosis;
pub mod dump;
pub mod error;
pub mod fault;
pub mod keymap;
pub mod metrics;
pub mod model;
pub mod report;
pub mod site;
pub mod tolerance;
pub mod weight_check;

pub use error::{Error, Result};
