//! The parameter sets tried for a fault family (the table's [`Grid`]), and the fits that
//! read parameters off the candidate: the base theta of its rotary table, the offset of
//! its decode positions.

use contract::error::Result;
use contract::fault::{Fault, Params, RotaryTable, Scaling};
use contract::site::{Site, Step};
use dump::{Dump, Precision};
use model::rope::RopeConfig;
use ndarray::Array2;

use crate::evidence::moved_positions;
use crate::faults::{facts, Grid};

/// Bases common in released checkpoints, tried beside the default and the configured
/// one (Llama 3's 500000, and 1000000).
const COMMON_THETAS: [f64; 2] = [500000.0, 1000000.0];

/// A fitted base within this relative distance of one already tried is not tried again.
const SAME_THETA: f64 = 1e-3;

/// The theta fit's grid over log10 theta: from `LOG_THETA_LOW` in `LOG_THETA_CELLS`
/// cells of `LOG_THETA_CELL` (2 to 8: theta from 100 to 10⁸).
const LOG_THETA_LOW: f64 = 2.0;
const LOG_THETA_CELL: f64 = 0.05;
const LOG_THETA_CELLS: u32 = 120;

/// Golden-section steps within the best cell (each narrows it by 0.618).
const SECTION_STEPS: usize = 60;

/// Significant digits a fitted theta is rounded to.
const THETA_DIGITS: f64 = 3.0;

/// The least magnitude a sine entry is divided by in the relative error the theta fit
/// minimises (the sine of position 0 is 0).
const LEAST_SINE: f64 = 1e-6;

/// Position offsets tried for `rope.pos_off_by_one` beside its default 1, when the
/// candidate's positions show no single offset.
const POSITION_OFFSETS: [i64; 3] = [2, 3, -1];

/// Cache slot offsets tried for `kv.wrong_slot` beside its default 1, where the decode
/// steps leave room for them.
const SLOT_OFFSETS: [i64; 2] = [2, 3];

/// `rope.wrong_theta`'s default base (10000).
fn default_theta() -> f64 {
    Params::default().theta_or_default()
}

/// The parameter sets to try for `fault`, its default form first.
pub(crate) fn param_grid(fault: Fault, golden: &Dump, candidate: &Dump) -> Result<Vec<Params>> {
    let mut out = vec![Params::default()];
    match facts(fault).grid {
        Grid::DefaultOnly => {}
        Grid::ThetaAndScaling => {
            let configured = RopeConfig::from_model(
                &golden.manifest.model,
                std::path::Path::new("manifest.json"),
            )
            .map(|r| r.theta)
            .unwrap_or(default_theta());
            let mut thetas = vec![default_theta(), configured];
            thetas.extend(COMMON_THETAS);
            // The bases that best reproduce the candidate's own rotary tables.
            for keep in [false, true] {
                if let Some(t) = fit_theta(golden, candidate, keep)? {
                    if thetas.iter().all(|g| (t / g - 1.0).abs() > SAME_THETA) {
                        thetas.push(t);
                    }
                }
            }
            thetas.dedup_by(|a, b| a == b);
            for theta in thetas {
                for scaling in [Scaling::Dropped, Scaling::Kept] {
                    // The configured theta with its scaling is the correct run.
                    if theta == configured && scaling == Scaling::Kept {
                        continue;
                    }
                    // The default form, already first.
                    if theta == default_theta() && scaling == Scaling::Dropped {
                        continue;
                    }
                    out.push(Params {
                        theta: Some(theta),
                        scaling: Some(scaling),
                        ..Params::default()
                    });
                }
            }
        }
        Grid::SlicedTable => {
            out.push(Params { table: Some(RotaryTable::Sliced), ..Params::default() });
        }
        Grid::PositionOffset => {
            let offsets = match position_offset(golden, candidate)? {
                Some(d) if d != 1 && d != 0 => vec![d],
                Some(_) => Vec::new(),
                None => POSITION_OFFSETS.to_vec(),
            };
            out.extend(
                offsets.into_iter().map(|o| Params { offset: Some(o), ..Params::default() }),
            );
        }
        Grid::SlotOffset => {
            // A write that lands past the cache at every step is `kv.stale`, not this.
            let steps = golden.manifest.scenario.decode_steps() as i64;
            out.extend(
                SLOT_OFFSETS
                    .into_iter()
                    .filter(|&o| o < steps)
                    .map(|o| Params { offset: Some(o), ..Params::default() }),
            );
        }
    }
    Ok(out)
}

/// The base theta whose rotary sin table (the configured scaling dropped, or kept)
/// comes closest to the candidate's prefill `model.rotary_emb.sin`; `None` when the
/// candidate did not dump the table.
fn fit_theta(golden: &Dump, candidate: &Dump, keep_scaling: bool) -> Result<Option<f64>> {
    let (Some(sin), Some(pos)) = (
        candidate.get(Step::Prefill, &Site::RotarySin)?,
        golden.get(Step::Prefill, &Site::PositionIds)?,
    ) else {
        return Ok(None);
    };
    let config =
        RopeConfig::from_model(&golden.manifest.model, std::path::Path::new("manifest.json"))?;
    let Ok(pos) = pos.to_array().into_dimensionality::<ndarray::Ix2>() else { return Ok(None) };
    let pos = pos.mapv(|p| p as i64);
    let target = sin.to_f64_vec();
    Ok(Some(fit_log_theta(|log_theta| sin_error(&config, &pos, &target, log_theta, keep_scaling))))
}

/// How far the sin table of base `10^log_theta` at positions `pos` `[batch, seq]` is
/// from `target` (flattened `[batch, seq, head_dim]`): the sum of squared relative
/// errors, as the small angles of the slow frequencies are where theta shows.
fn sin_error(
    config: &RopeConfig,
    pos: &Array2<i64>,
    target: &[f64],
    log_theta: f64,
    keep_scaling: bool,
) -> f64 {
    use model::numerics::Exact;
    use model::plan::{AnglePrecision, RopeFrequencies};
    use model::rope::Rope;
    let frequencies = RopeFrequencies::Wrong { theta: 10f64.powf(log_theta), keep_scaling };
    let mut rope = Rope::new(config.clone(), frequencies, AnglePrecision::Numerics);
    let (_, s) = rope.tables(pos, &Exact::new(Precision::F32));
    if s.len() != target.len() {
        return f64::INFINITY;
    }
    s.iter().zip(target).map(|(a, b)| ((a - b) / b.abs().max(LEAST_SINE)).powi(2)).sum()
}

/// The theta minimising `error` (a function of log10 theta): the best point of a grid
/// over log10 theta, then a golden-section search in the cell around it, rounded to
/// [`THETA_DIGITS`] significant digits.
fn fit_log_theta(error: impl Fn(f64) -> f64) -> f64 {
    let best = (0..=LOG_THETA_CELLS)
        .map(|i| LOG_THETA_LOW + LOG_THETA_CELL * f64::from(i))
        .map(|x| (x, error(x)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(default_theta().log10(), |(x, _)| x);
    // Golden-section search in the best cell: one new evaluation a step.
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut lo, mut hi) = (best - LOG_THETA_CELL, best + LOG_THETA_CELL);
    let (mut a, mut b) = (hi - r * (hi - lo), lo + r * (hi - lo));
    let (mut ea, mut eb) = (error(a), error(b));
    for _ in 0..SECTION_STEPS {
        if ea < eb {
            (hi, b, eb) = (b, a, ea);
            a = hi - r * (hi - lo);
            ea = error(a);
        } else {
            (lo, a, ea) = (a, b, eb);
            b = lo + r * (hi - lo);
            eb = error(b);
        }
    }
    round_significant(10f64.powf((lo + hi) / 2.0))
}

/// `theta` rounded to [`THETA_DIGITS`] significant digits.
fn round_significant(theta: f64) -> f64 {
    let magnitude = 10f64.powf(theta.log10().floor() - (THETA_DIGITS - 1.0));
    (theta / magnitude).round() * magnitude
}

/// How far the candidate's decode positions are from the golden's at the first decode
/// step where they differ, when every row is off by the same amount (0 when they are
/// those of another position fault).
fn position_offset(golden: &Dump, candidate: &Dump) -> Result<Option<i64>> {
    Ok(moved_positions(golden, candidate)?
        .and_then(|m| offset_between(m.step, &m.golden, &m.candidate)))
}

/// The offset of the `candidate` positions fed at `step` from the `golden` ones, when
/// every row is off by the same amount; 0 when the candidate's are those of
/// `rope.pos_reset` or `rope.pos_fixed` (the step index or 0 in every row), whatever
/// offset they happen to equal for one row.
fn offset_between(step: Step, golden: &[f64], candidate: &[f64]) -> Option<i64> {
    let Step::Decode(j) = step else { return None };
    if candidate.iter().all(|&x| x == j as f64) || candidate.iter().all(|&x| x == 0.0) {
        return Some(0);
    }
    let d: Vec<f64> = candidate.iter().zip(golden).map(|(c, g)| c - g).collect();
    if golden.len() == candidate.len() && d.iter().all(|x| *x == d[0]) {
        Some(d[0] as i64)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::rope::RopeType;

    #[test]
    fn the_theta_fit_finds_the_minimum_of_a_smooth_error_to_three_digits() {
        for theta in [123456.0_f64, 500000.0, 2718.28, 10000.0] {
            let fitted = fit_log_theta(|x| (x - theta.log10()).powi(2));
            assert_eq!(fitted, round_significant(theta), "{theta}");
        }
        assert_eq!(round_significant(123456.0), 123000.0);
        assert_eq!(round_significant(2718.28), 2720.0);
    }

    #[test]
    fn the_theta_fit_reads_the_base_off_a_synthetic_rotary_table() {
        let config = RopeConfig {
            theta: 10000.0,
            dim: 8,
            max_position_embeddings: 64,
            kind: RopeType::Default,
        };
        let pos = Array2::from_shape_fn((2, 9), |(b, t)| (3 * b + t) as i64);
        for theta in [500000.0_f64, 31400.0] {
            let target: Vec<f64> = {
                let frequencies =
                    model::plan::RopeFrequencies::Wrong { theta, keep_scaling: false };
                let mut rope = model::rope::Rope::new(
                    config.clone(),
                    frequencies,
                    model::plan::AnglePrecision::Numerics,
                );
                let (_, s) = rope.tables(&pos, &model::numerics::Exact::new(Precision::F32));
                s.iter().copied().collect()
            };
            let fitted = fit_log_theta(|x| sin_error(&config, &pos, &target, x, false));
            assert_eq!(fitted, theta);
        }
    }

    #[test]
    fn a_sin_table_of_another_shape_is_infinitely_far() {
        let config = RopeConfig {
            theta: 10000.0,
            dim: 8,
            max_position_embeddings: 64,
            kind: RopeType::Default,
        };
        let pos = Array2::from_shape_fn((1, 3), |(_, t)| t as i64);
        assert_eq!(sin_error(&config, &pos, &[0.0; 5], 4.0, false), f64::INFINITY);
    }

    #[test]
    fn a_common_offset_of_every_row_is_read_off_the_positions() {
        let d0 = Step::Decode(0);
        assert_eq!(offset_between(d0, &[6.0, 9.0], &[9.0, 12.0]), Some(3));
        assert_eq!(offset_between(d0, &[6.0, 9.0], &[5.0, 8.0]), Some(-1));
        assert_eq!(offset_between(d0, &[6.0, 9.0], &[7.0, 11.0]), None, "rows disagree");
        assert_eq!(offset_between(d0, &[6.0, 9.0], &[7.0]), None, "rows missing");
    }

    #[test]
    fn reset_or_fixed_positions_read_as_offset_zero_whatever_one_row_shows() {
        // decode.2 fed 2 in every row (reset), or 0 (fixed); the first row's offset
        // happens to be -1 or -3.
        let d2 = Step::Decode(2);
        assert_eq!(offset_between(d2, &[3.0, 9.0], &[2.0, 2.0]), Some(0));
        assert_eq!(offset_between(d2, &[3.0, 9.0], &[0.0, 0.0]), Some(0));
        assert_eq!(offset_between(Step::Prefill, &[3.0], &[4.0]), None);
    }

    #[test]
    fn the_common_bases_and_offsets_are_not_the_defaults() {
        assert!(!COMMON_THETAS.contains(&default_theta()));
        assert_eq!(default_theta(), 10000.0);
        let default_offset = Params::default().offset_or_default();
        assert!(!POSITION_OFFSETS.contains(&default_offset) && !POSITION_OFFSETS.contains(&0));
        assert!(!SLOT_OFFSETS.contains(&default_offset) && SLOT_OFFSETS.iter().all(|&o| o > 1));
        assert_eq!(
            LOG_THETA_LOW + LOG_THETA_CELL * f64::from(LOG_THETA_CELLS),
            8.0,
            "the grid ends at 10^8"
        );
    }
}
