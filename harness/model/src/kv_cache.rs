//! The KV cache: preallocated `[batch, kv_heads, max_len, head_dim]` buffers written in
//! place at the step's slots, never concatenated (what a static-cache port does; HF's
//! `DynamicCache.update` concatenates, with the same filled contents).
//!
//! The dumped `k_cache`/`v_cache` are the first `S` slots, `S` = tokens held after the
//! step. Which slot a step writes is a fault seam ([`CacheWrite`]).

use ndarray::{s, Array4, ArrayView4};

use super::plan::CacheWrite;

/// One layer's cache.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Array4<f64>,
    v: Array4<f64>,
    len: usize,
}

impl KvCache {
    /// Empty buffers `[batch, kv_heads, max_len, head_dim]`.
    pub fn new(batch: usize, kv_heads: usize, max_len: usize, head_dim: usize) -> KvCache {
        KvCache {
            k: Array4::zeros((batch, kv_heads, max_len, head_dim)),
            v: Array4::zeros((batch, kv_heads, max_len, head_dim)),
            len: 0,
        }
    }

    /// Slots filled so far (`S`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.k.dim().2
    }

    /// Writes `k`, `v` `[batch, kv_heads, T, head_dim]` at slots `len..len + T` (or where
    /// `rule` puts them) and advances `len` by `T`. A write past the capacity is dropped
    /// (the buffers do not grow); the caller sizes the cache for the whole scenario.
    pub fn append(&mut self, k: &Array4<f64>, v: &Array4<f64>, rule: CacheWrite) {
        let t = k.dim().2;
        let start = match rule {
            CacheWrite::NextSlot => Some(self.len),
            CacheWrite::Skip => None,
            CacheWrite::SlotsOff(by) => Some(self.len + by),
        };
        if let Some(start) = start {
            let end = (start + t).min(self.capacity());
            if start < end {
                let n = end - start;
                self.k.slice_mut(s![.., .., start..end, ..]).assign(&k.slice(s![.., .., ..n, ..]));
                self.v.slice_mut(s![.., .., start..end, ..]).assign(&v.slice(s![.., .., ..n, ..]));
            }
        }
        self.len += t;
    }

    /// The filled keys `[batch, kv_heads, S, head_dim]`.
    pub fn keys(&self) -> ArrayView4<'_, f64> {
        self.k.slice(s![.., .., ..self.len, ..])
    }

    /// The filled values `[batch, kv_heads, S, head_dim]`.
    pub fn values(&self) -> ArrayView4<'_, f64> {
        self.v.slice(s![.., .., ..self.len, ..])
    }
}
