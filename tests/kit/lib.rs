//! What llama-parity's integration tests and benchmarks share and the library does not
//! need: fixed-seed pseudo-random values for synthetic dumps, and this process's peak
//! memory and CPU time for the benchmarks' and the loader tests' measurements.

/// SplitMix64's output function: a well-mixed 64-bit value from `x`. Synthetic data is
/// a pure function of a fixed seed, so every run makes the same bytes.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A value in [-1, 1) from `seed`, with 53 bits of [`splitmix`].
pub fn unit(seed: u64) -> f64 {
    (splitmix(seed) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Peak resident set of this process (`VmHWM`), in bytes; 0 where `/proc` has none.
pub fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds (user + system) this process has used; 0 where `/proc` has none.
pub fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // SplitMix64 seeded with 0: the first outputs of the reference generator
        // (state advanced by the golden gamma before each output).
        assert_eq!(splitmix(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn unit_values_lie_in_minus_one_to_one() {
        assert!((0..10_000).map(unit).all(|u| (-1.0..1.0).contains(&u)));
    }
}
