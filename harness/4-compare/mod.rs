//! Stage 4, the comparison: aligns the sites of a golden and a candidate, measures each
//! pair ([`metrics`]), judges it against the tolerance policy ([`tolerance`]) and
//! reaches a verdict ([`verdict`]). Value sites are measured from the stored bytes at
//! memory speed ([`lanes`]), sites spread over every core.
//!
//! Uses the contract and the dump stage; knows nothing of models or diagnosis.

pub mod lanes;
pub mod metrics;
pub mod tolerance;
pub mod verdict;

pub use self::verdict::*;
