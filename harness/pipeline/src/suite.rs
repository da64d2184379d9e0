//! The suite: every implementation on every golden, every faulty candidate against its
//! golden, as one matrix, and what each run of it must give.
//!
//! A [`Plan`] says what runs: for each golden dump under a directory, the float64
//! reference and the simulated Ascend port at bfloat16 and float16 (and the real
//! MindSpore port at float32 and float16 when asked), each of which must pass; for each
//! candidate `<golden>__<fault>` beside them, the comparison with its golden, which must
//! fail with the planted fault ranked first in the diagnosis. A real trained model's
//! goldens ([`RealModel`]: a float32 and a bfloat16 golden made from one checkpoint)
//! add every implementation on it and a fault matrix at bfloat16, each fault expected
//! caught and named or, where pinned so, under the floor; every run's record carries
//! its worst site's distance from the noise floor. [`Plan::run`] runs it
//! through [`crate::run`] and [`crate::check`] into a [`Suite`]; [`Suite::write`] keeps
//! each run's report and the matrix as `suite.json` ([`Record`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use compare::tolerance::Policy;
use compare::{SiteMetrics, Verdict};
use contract::error::{Error, Result};
use contract::fault::Fault;
use dump::{Dump, Precision};
use model::{Device, Implementation, RunContext, RunOptions};
use report::baseline::Baseline;
use report::Report;

use crate::candidate::{Candidate, Naming};
use crate::Options;

/// What one run of the matrix must give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub verdict: Verdict,
    /// The fault the diagnosis must rank first (a faulty candidate's planted fault).
    pub diagnosis: Option<String>,
    /// The diagnosis must name no fault.
    pub unnamed: bool,
}

impl Expect {
    /// A correct run: it passes.
    pub fn pass() -> Expect {
        Expect { verdict: Verdict::Pass, diagnosis: None, unnamed: false }
    }

    /// A faulty candidate: it fails, and `fault` is ranked first.
    pub fn diagnosed(fault: impl Into<String>) -> Expect {
        Expect { verdict: Verdict::Fail, diagnosis: Some(fault.into()), unnamed: false }
    }

    /// A candidate with a fault no known fault describes (`<golden>__other_<what>`): it
    /// fails and no fault is named.
    pub fn unnamed() -> Expect {
        Expect { verdict: Verdict::Fail, diagnosis: None, unnamed: true }
    }

    /// True when `report` gives what is expected.
    pub fn met_by(&self, report: &Report) -> bool {
        report.verdict == self.verdict
            && self
                .diagnosis
                .as_ref()
                .is_none_or(|fault| report.diagnosis.first().is_some_and(|f| &f.fault == fault))
            && (!self.unnamed || report.diagnosis.is_empty())
    }
}

/// What a run of the matrix compares with its golden.
#[derive(Debug, Clone)]
pub enum Subject {
    /// An implementation's run on the golden's scenario.
    Implementation(Box<RunOptions>),
    /// A candidate on disk (any layout [`Candidate::open`] reads).
    Candidate(PathBuf),
}

/// One run of the matrix, before it runs.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The golden's name (its directory's).
    pub golden: String,
    /// The run's name in the matrix: `reference`, `ascend bfloat16`, `candidate rope.pos_reset`.
    pub run: String,
    pub subject: Subject,
    pub expect: Expect,
}

/// The goldens of a suite and every run planned on them, golden by golden.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Each golden dump's name in the matrix and its directory, the suite's sorted and
    /// then the real model's; the runs on each follow in `runs`.
    pub goldens: Vec<(String, PathBuf)>,
    pub runs: Vec<Planned>,
}

/// A real trained model's goldens for the suite: `<dir>/golden_f32` and
/// `<dir>/golden_bf16`, made from one checkpoint by `golden/make_smollm2.py`.
#[derive(Debug, Clone)]
pub struct RealModel<'a> {
    /// The directory holding the two goldens; the matrix names them `<name>_f32`,
    /// `<name>_bf16` after its last component.
    pub dir: &'a Path,
    /// Run the MindSpore port (float32, float16 on the float32 golden; bfloat16 on the
    /// bfloat16 one).
    pub mindspore: bool,
    /// Run MindFormers' Llama (float32, on the CPU).
    pub mindformers: bool,
    /// The faults of the matrix (planted in the simulated Ascend port at bfloat16);
    /// `None`: every fault of [`REAL_MODEL_FAULTS`].
    pub faults: Option<&'a [Fault]>,
}

/// What each fault planted at bfloat16 in the simulated Ascend port gives on the real
/// model (SmolLM2-135M-Instruct, the prompt of `golden/make_smollm2.py`), as measured:
/// `true` caught and named first by the diagnosis, `false` under the noise floor (the
/// run passes; its record says how near the floor it comes). A fault the simulated port
/// cannot plant is left out.
///
/// Under the floor: `rope.low_precision_angles` (positions 0 to 17), `norm.eps_outside`,
/// `norm.no_upcast` and `attn.softmax_low_precision`, each within the floor's margin;
/// `mask.padding_ignored` and `mask.pad_token_masked` act on padding and on real tokens
/// with the pad id, which the one unpadded prompt lacks; `mask.fp16_overflow` acts in
/// float16 only.
pub const REAL_MODEL_FAULTS: &[(Fault, bool)] = &[
    (Fault::RopePosReset, true),
    (Fault::RopePosFixed, true),
    (Fault::RopePosOffByOne, true),
    (Fault::RopeInterleaved, true),
    (Fault::RopeCosSinSwapped, true),
    (Fault::RopeWrongTheta, true),
    (Fault::RopeLowPrecisionAngles, false),
    (Fault::MaskNone, true),
    (Fault::MaskInverted, true),
    (Fault::MaskPaddingIgnored, false),
    (Fault::MaskPadTokenMasked, false),
    (Fault::MaskFp16Overflow, false),
    (Fault::NormLayernorm, true),
    (Fault::NormBias, true),
    (Fault::NormEpsOutside, false),
    (Fault::NormNoUpcast, false),
    (Fault::NormWeightUnmapped, true),
    (Fault::WeightsTransposed, true),
    (Fault::WeightsGateUpSwapped, true),
    (Fault::KvStale, true),
    (Fault::KvWrongSlot, true),
    (Fault::KvUnrotatedKeys, true),
    (Fault::KvGqaTiled, true),
    (Fault::AttnNoScale, true),
    (Fault::AttnSoftmaxLowPrecision, false),
];

impl RealModel<'_> {
    /// The two goldens' directories, when both hold a manifest.
    pub fn goldens(&self) -> Option<(PathBuf, PathBuf)> {
        let f32 = self.dir.join("golden_f32");
        let bf16 = self.dir.join("golden_bf16");
        (f32.join("manifest.json").is_file() && bf16.join("manifest.json").is_file())
            .then_some((f32, bf16))
    }

    /// Its runs, golden by golden, when both goldens are there.
    fn plan(&self) -> Option<Plan> {
        let (f32_dir, bf16_dir) = self.goldens()?;
        let base = name(self.dir);
        let (g32, g16) = (format!("{base}_f32"), format!("{base}_bf16"));
        let mut on32 = vec![
            ("reference".to_string(), run_options(Implementation::Reference, None)),
            (
                "ascend float16".to_string(),
                run_options(Implementation::Ascend, Some(Precision::F16)),
            ),
        ];
        let mut on16 = vec![(
            "ascend bfloat16".to_string(),
            run_options(Implementation::Ascend, Some(Precision::Bf16)),
        )];
        if self.mindspore {
            for p in [Precision::F32, Precision::F16] {
                on32.push((
                    format!("mindspore {p}"),
                    run_options(Implementation::MindSpore, Some(p)),
                ));
            }
            on16.push((
                "mindspore bfloat16".to_string(),
                run_options(Implementation::MindSpore, Some(Precision::Bf16)),
            ));
        }
        if self.mindformers {
            on32.push((
                "mindformers float32".to_string(),
                run_options(Implementation::MindFormers(Device::Cpu), Some(Precision::F32)),
            ));
        }
        let mut runs: Vec<Planned> = Vec::new();
        for (golden, list) in [(&g32, on32), (&g16, on16)] {
            runs.extend(list.into_iter().map(|(run, opts)| Planned {
                golden: golden.clone(),
                run,
                subject: Subject::Implementation(Box::new(opts)),
                expect: Expect::pass(),
            }));
        }
        for &(fault, caught) in REAL_MODEL_FAULTS {
            if self.faults.is_some_and(|only| !only.contains(&fault)) {
                continue;
            }
            let opts = run_options(Implementation::Ascend, Some(Precision::Bf16))
                .with_faults(vec![fault.into()]);
            runs.push(Planned {
                golden: g16.clone(),
                run: format!("ascend bfloat16 {}", fault.id()),
                subject: Subject::Implementation(Box::new(opts)),
                expect: if caught { Expect::diagnosed(fault.id()) } else { Expect::pass() },
            });
        }
        Some(Plan { goldens: vec![(g32, f32_dir), (g16, bf16_dir)], runs })
    }
}

/// The largest ratio of a site's rel-L2 to its noise floor's, and that site
/// (`<step>/<site>`), over the sites of `report` where a floor was measured.
pub fn floor_distance(report: &Report) -> Option<(f64, String)> {
    let mut best: Option<(f64, String)> = None;
    for e in &report.sites {
        let (Some(SiteMetrics::Values(m)), Some(f)) = (&e.metrics, &e.noise_floor) else {
            continue;
        };
        if f.rel_l2.is_nan() || f.rel_l2 <= 0.0 || m.rel_l2.is_nan() {
            continue;
        }
        let x = m.rel_l2 / f.rel_l2;
        if best.as_ref().is_none_or(|(b, _)| x > *b) {
            best = Some((x, format!("{}/{}", e.step, e.site)));
        }
    }
    best
}

/// How to run a plan.
#[derive(Clone, Copy)]
pub struct SuiteOptions<'a> {
    /// A previous suite's report directory (`<dir>/<golden>/<run>/report.json`): each
    /// run is held against its accepted report there; a run without one is not gated.
    pub baseline: Option<&'a Path>,
    /// How much a site's error may grow beyond its noise before it regresses.
    pub max_regression: f64,
    /// Called with a line before each run.
    pub progress: &'a dyn Fn(&str),
    /// What every run is made within (port paths, the sha256 check, who is told of
    /// progress and warnings).
    pub context: &'a RunContext,
}

/// One run of the matrix, done.
#[derive(Debug)]
pub struct SuiteRun {
    pub golden: String,
    pub run: String,
    pub expect: Expect,
    /// The report, or the error that stopped the run, in words.
    pub outcome: std::result::Result<Report, String>,
    pub seconds: f64,
}

impl SuiteRun {
    /// True when the run gave what was expected.
    pub fn ok(&self) -> bool {
        self.outcome.as_ref().is_ok_and(|r| self.expect.met_by(r))
    }

    /// Its directory under a suite's report directory: `<golden>/<run, spaces as _>`.
    pub fn dir(&self) -> PathBuf {
        Path::new(&self.golden).join(run_dir(&self.run))
    }

    /// Its line of `suite.json`.
    pub fn record(&self) -> Record {
        let report = self.outcome.as_ref().ok();
        Record {
            diagnosis: report.and_then(|r| r.diagnosis.first().map(|f| f.fault.clone())),
            error: self.outcome.as_ref().err().cloned(),
            expected: self.expect.verdict,
            first_divergence: report.and_then(|r| {
                r.first_divergence.as_ref().map(|f| format!("{}/{}", f.step, f.site))
            }),
            floor_distance: report.and_then(floor_distance).map(|(x, _)| x),
            floor_site: report.and_then(floor_distance).map(|(_, s)| s),
            golden: self.golden.clone(),
            ok: self.ok(),
            run: self.run.clone(),
            verdict: report.map(|r| r.verdict),
        }
    }
}

/// One run in `suite.json` (an array of these, in the matrix's order). The fields are
/// written in this order, alphabetical, as the file has always had them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The fault the diagnosis ranked first.
    pub diagnosis: Option<String>,
    /// What stopped the run, when it did not finish.
    pub error: Option<String>,
    pub expected: Verdict,
    /// `<step>/<site>`.
    pub first_divergence: Option<String>,
    /// The largest ratio of a site's rel-L2 to the noise floor's there (what correct
    /// runs of the model reach at that site in the run's dtype), over the sites where a
    /// floor was measured: at most the floor's margin for a run the floor lets pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_distance: Option<f64>,
    /// The `<step>/<site>` of `floor_distance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_site: Option<String>,
    pub golden: String,
    /// The run gave what was expected (verdict, and the planted fault ranked first).
    pub ok: bool,
    pub run: String,
    pub verdict: Option<Verdict>,
}

/// The matrix, done.
#[derive(Debug)]
pub struct Suite {
    pub runs: Vec<SuiteRun>,
}

impl Suite {
    /// The runs that did not give what was expected.
    pub fn unexpected(&self) -> usize {
        self.runs.iter().filter(|r| !r.ok()).count()
    }

    /// `suite.json`: one [`Record`] a run, pretty-printed, with a final line break.
    pub fn to_json(&self) -> String {
        let records: Vec<Record> = self.runs.iter().map(SuiteRun::record).collect();
        serde_json::to_string_pretty(&records).unwrap_or_default() + "\n"
    }

    /// Writes each finished run's report into `dir/<golden>/<run>/` and the matrix
    /// into `dir/suite.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        for r in &self.runs {
            if let Ok(rep) = &r.outcome {
                rep.write(&dir.join(r.dir()))?;
            }
        }
        dump::write_atomic(&dir.join("suite.json"), self.to_json().as_bytes())
    }
}

impl Plan {
    /// The plan for the goldens under `goldens` (each subdirectory holding a
    /// `manifest.json`) and the candidates under `candidates` named
    /// `<golden>__<fault id, dots as _>` (none when it is not a directory), with the
    /// MindSpore port's runs when `mindspore`.
    pub fn new(goldens: &Path, candidates: &Path, mindspore: bool) -> Result<Plan> {
        let mut plan = Plan { goldens: Vec::new(), runs: Vec::new() };
        plan.add(goldens, candidates, mindspore)?;
        Ok(plan)
    }

    /// Adds the goldens under `goldens` and their candidates under `candidates` (another
    /// set: the LoRA set, say) as [`Plan::new`] plans them. A candidate
    /// `<golden>__other_<what>` holds a fault outside the contract's: it must fail with
    /// no fault named. `lora.merged_low_precision` on a bfloat16 or float16 golden must
    /// pass: a fold in that dtype differs from one in float32 by at most one unit in the
    /// last place of each weight, within the golden's own rounding (golden/README.md).
    pub fn add(&mut self, goldens: &Path, candidates: &Path, mindspore: bool) -> Result<()> {
        let golden_dirs = list_dirs(goldens)?;
        let candidate_dirs = if candidates.is_dir() { list_dirs(candidates)? } else { Vec::new() };
        let mut runs = Vec::new();
        for gdir in &golden_dirs {
            let golden = name(gdir);
            let mut implementations =
                vec![("reference".to_string(), run_options(Implementation::Reference, None))];
            // A training step whose float16 gradients overflowed and was skipped is that
            // dtype's step: at bfloat16 the same scale does not overflow (a different
            // step, the remedy of switching to bfloat16), so the port runs at float16.
            let low = if skipped_float16_step(gdir)? {
                vec![Precision::F16]
            } else {
                vec![Precision::Bf16, Precision::F16]
            };
            for p in low {
                implementations
                    .push((format!("ascend {p}"), run_options(Implementation::Ascend, Some(p))));
            }
            if mindspore {
                // A training step runs the port at the golden's own dtype (its loss
                // scale is that dtype's); an inference golden at float32 and float16.
                let ports = match training_dtype(gdir)? {
                    Some(p) => vec![p],
                    None => vec![Precision::F32, Precision::F16],
                };
                for p in ports {
                    implementations.push((
                        format!("mindspore {p}"),
                        run_options(Implementation::MindSpore, Some(p)),
                    ));
                }
            }
            for (run, opts) in implementations {
                runs.push(Planned {
                    golden: golden.clone(),
                    run,
                    subject: Subject::Implementation(Box::new(opts)),
                    expect: Expect::pass(),
                });
            }
            for cdir in
                candidate_dirs.iter().filter(|c| name(c).split("__").next() == Some(&golden))
            {
                let dir_fault = name(cdir).split("__").nth(1).unwrap_or_default().to_string();
                let parsed = Fault::parse_underscored(&dir_fault);
                let low_precision_golden = || {
                    dump::Manifest::load(&gdir.join("manifest.json"))
                        .is_ok_and(|m| m.dtype != Precision::F32)
                };
                let expect = match parsed {
                    Some(Fault::LoraMergedLowPrecision) if low_precision_golden() => Expect::pass(),
                    Some(f) => Expect::diagnosed(f.id()),
                    None if dir_fault.starts_with("other_") => Expect::unnamed(),
                    None => Expect::diagnosed(dir_fault.clone()),
                };
                let fault = parsed.map_or(dir_fault, |f| f.id().to_string());
                runs.push(Planned {
                    golden: golden.clone(),
                    run: format!("candidate {fault}"),
                    subject: Subject::Candidate(cdir.clone()),
                    expect,
                });
            }
        }
        self.goldens.extend(golden_dirs.into_iter().map(|d| (name(&d), d)));
        self.runs.extend(runs);
        Ok(())
    }

    /// Adds the real model's goldens and runs ([`RealModel`]) when both its goldens are
    /// there; returns whether they were.
    pub fn add_real_model(&mut self, real: &RealModel) -> bool {
        let Some(plan) = real.plan() else { return false };
        self.goldens.extend(plan.goldens);
        self.runs.extend(plan.runs);
        true
    }

    /// Runs every planned run, golden by golden, each judged by the default policy and
    /// held against its accepted report under `opts.baseline` when there is one. A run
    /// that cannot be carried out is an error in its row, not the suite's; a golden
    /// that cannot be opened stops the suite.
    pub fn run(&self, opts: &SuiteOptions) -> Result<Suite> {
        if let Some(b) = opts.baseline {
            if !b.is_dir() {
                return Err(Error::format(
                    b,
                    "not a directory of a previous suite's reports (<dir>/<golden>/<run>/report.json)",
                ));
            }
        }
        let policy = Policy::default();
        let mut done = Vec::new();
        for (gname, gdir) in &self.goldens {
            let golden = Dump::open(gdir)?;
            for p in self.runs.iter().filter(|p| &p.golden == gname) {
                (opts.progress)(&format!("suite: {gname}: {}", p.run));
                let t = Instant::now();
                let outcome = (|| -> Result<Report> {
                    let baseline = match opts.baseline {
                        Some(dir) => accepted(dir, &p.golden, &p.run)?,
                        None => None,
                    };
                    let check = Options {
                        baseline: baseline.as_ref(),
                        max_regression: opts.max_regression,
                        context: opts.context,
                        ..Options::new(&policy)
                    };
                    match &p.subject {
                        Subject::Implementation(run) => {
                            let run = run.clone().with_context(opts.context.clone());
                            crate::run(&golden, &run, None, &check).map(|(_, report)| report)
                        }
                        Subject::Candidate(dir) => {
                            let cand = Candidate::open(dir, Naming::default(), &golden.manifest)?;
                            crate::check(&golden, &cand, None, &check)
                        }
                    }
                })()
                .map_err(|e| e.to_string());
                done.push(SuiteRun {
                    golden: gname.clone(),
                    run: p.run.clone(),
                    expect: p.expect.clone(),
                    outcome,
                    seconds: t.elapsed().as_secs_f64(),
                });
            }
        }
        Ok(Suite { runs: done })
    }
}

/// The accepted report of one run under a previous suite's report directory, when
/// there is one.
fn accepted(dir: &Path, golden: &str, run: &str) -> Result<Option<Baseline>> {
    let p = dir.join(golden).join(run_dir(run)).join("report.json");
    if p.is_file() {
        Baseline::load(&p).map(Some)
    } else {
        Ok(None)
    }
}

/// A correct run of `implementation` at `precision` (`None`: the golden's).
/// The dtype of the golden under `dir` when it is a training step.
fn training_dtype(dir: &Path) -> Result<Option<Precision>> {
    let m = dump::Manifest::load(&dir.join("manifest.json"))?;
    Ok(m.train.is_some().then_some(m.dtype))
}

/// Whether the golden under `dir` is a float16 training step that overflowed and was
/// skipped (its `grad_norm` non-finite).
fn skipped_float16_step(dir: &Path) -> Result<bool> {
    let golden = Dump::open(dir)?;
    if golden.manifest.train.is_none() || golden.manifest.dtype != Precision::F16 {
        return Ok(false);
    }
    let norm = golden.get(contract::site::Step::Train, &contract::site::Site::GradNorm)?;
    Ok(norm.is_some_and(|t| t.to_array().iter().any(|x| !x.is_finite())))
}

fn run_options(implementation: Implementation, precision: Option<Precision>) -> RunOptions {
    RunOptions::new(implementation).with_precision(precision)
}

/// The directory of one run's report under `<dir>/<golden>/`.
fn run_dir(run: &str) -> String {
    run.replace(' ', "_")
}

/// The subdirectories of `dir` holding a `manifest.json`, sorted.
fn list_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    v.sort();
    Ok(v)
}

fn name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_written_with_its_fields_in_the_files_order_and_reads_back() {
        let r = Record {
            diagnosis: Some("rope.pos_reset".into()),
            error: None,
            expected: Verdict::Fail,
            first_divergence: Some("decode.0/inputs.position_ids".into()),
            floor_distance: None,
            floor_site: None,
            golden: "gqa_pad_f32".into(),
            ok: true,
            run: "candidate rope.pos_reset".into(),
            verdict: Some(Verdict::Fail),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"diagnosis":"rope.pos_reset","error":null,"expected":"fail","first_divergence":"decode.0/inputs.position_ids","golden":"gqa_pad_f32","ok":true,"run":"candidate rope.pos_reset","verdict":"fail"}"#
        );
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }
}
