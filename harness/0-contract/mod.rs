//! Stage 0, the contract: what every other stage speaks (CONTRACT.md).
//!
//! - [`site`]: steps and sites, and the order in which the model computes them;
//! - [`fault`]: the known porting faults and their stable IDs;
//! - [`error`]: the library's one error type, naming the file, tensor or field at fault.
//!
//! Uses nothing else in the crate.

pub mod error;
pub mod fault;
pub mod site;
