//! Stage 2, weights: HF checkpoint directories, memory-mapped in their stored dtype
//! ([`checkpoint`]); a port's weights: MindSpore checkpoints ([`ckpt`]), the key maps that say
//! how a port names and lays out each HF parameter ([`keymap`]), and `check-weights`
//! ([`check`]), which checks a converted checkpoint against the HF weights; PEFT LoRA
//! adapters ([`adapter`], CONTRACT §5) and `check-weights` on a port's adapter
//! checkpoint ([`check_adapter`]).
//!
//! Uses the contract and the dump stage.

pub mod adapter;
pub mod check;
pub mod check_adapter;
pub mod checkpoint;
pub mod ckpt;
pub mod keymap;
