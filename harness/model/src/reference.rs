//! `parity run --impl reference`: the golden's scenario through the float64 model,
//! as an in-memory dump (the steps and teacher forcing are [`super::runner`]'s).

use contract::error::Result;
use dump::{Dump, Precision};

use crate::context::RunContext;
use crate::numerics::Exact;
use crate::plan::Plan;
use crate::run::RunOutput;
use crate::runner::{load_model, RopeTableSource, Runner};

/// Runs `golden`'s scenario; `precision` is the dtype the dump declares (its tolerance
/// class), the golden's when `None`; the run is told to `ctx`.
pub fn run(
    golden: &Dump,
    precision: Option<Precision>,
    plan: &Plan,
    teacher_force: bool,
    ctx: &RunContext,
) -> Result<RunOutput> {
    let mut warnings = Vec::new();
    let model = load_model(golden, plan, ctx, &mut warnings)?;
    // Hidden mask entries hold the golden dtype's finfo.min, as HF's eager mask does.
    let numerics = Exact::new(golden.manifest.dtype);
    let runner = Runner {
        implementation: "reference",
        numerics: &numerics,
        plan,
        declared: precision.unwrap_or(golden.manifest.dtype),
        rope_tables: RopeTableSource::PerStep,
        watch: None,
        context: ctx,
    };
    let out = runner.run(&model, golden, teacher_force)?;
    Ok(RunOutput { warnings, ..out })
}

/// The teacher-forced run alone: each layer fed the golden's own input to it
/// (`model.embed_tokens` for layer 0, `model.layers.{i-1}` for layer `i`), so that each
/// site's error against the golden is what that layer adds, not what it inherits. The
/// check that the reference reproduces a golden reads it. The run is told to `ctx`
/// (the warnings of loading the weights go to its sink).
pub fn run_teacher_forced(golden: &Dump, ctx: &RunContext) -> Result<Dump> {
    let plan = Plan::default();
    let mut warnings = Vec::new();
    let model = load_model(golden, &plan, ctx, &mut warnings)?;
    let numerics = Exact::new(golden.manifest.dtype);
    let runner = Runner {
        implementation: "reference",
        numerics: &numerics,
        plan: &plan,
        declared: golden.manifest.dtype,
        rope_tables: RopeTableSource::PerStep,
        watch: None,
        context: ctx,
    };
    runner.run_scenario(&model, golden, Some(golden))
}
