//! Stage 4, the comparison: aligns the sites of a golden and a candidate, measures each
//! pair ([`metrics`]), judges it against the tolerance policy ([`tolerance`]) and
//! reaches a verdict ([`verdict`]). Value sites are measured from the stored bytes at
//! memory speed ([`lanes`], on the four-lane vectors of `simd`), sites and the blocks of
//! large tensors spread over every core.
//!
//! Uses the contract and the dump stage, and the model stage only in [`floor`] (to
//! measure what correct runs of the golden's model reach); knows nothing of diagnosis.

pub mod floor;
pub mod lanes;
pub mod metrics;
pub mod reproduce;
mod simd;
pub mod statistics;
pub mod tolerance;
pub mod train;
pub mod verdict;

pub use self::verdict::*;
