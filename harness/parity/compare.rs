//! `parity compare GOLDEN CANDIDATE`: judge a port's dump (a contract dump, a key-mapped
//! one, or an msprobe dump) against the golden.

use std::process::ExitCode;

use llama_parity::dump::guard;
use llama_parity::pipeline::{self, Candidate, Naming};
use llama_parity::Result;

use crate::args::CompareArgs;
use crate::import::site_map;
use crate::output::{
    check_options, common_outputs, finish, floor, load_baseline, load_policy, summary_only,
};

pub fn cmd_compare(a: CompareArgs) -> Result<ExitCode> {
    let inputs = [
        Some(a.golden.as_path()),
        Some(&a.candidate),
        a.common.policy.as_deref(),
        a.map.as_deref(),
        a.common.baseline.as_deref(),
    ];
    guard::check_outputs(
        &inputs.into_iter().flatten().collect::<Vec<_>>(),
        &common_outputs(&a.common),
    )?;
    let policy = load_policy(&a.common)?;
    let floor = floor(&a.common)?;
    let baseline = load_baseline(&a.common)?;
    let golden = pipeline::open_golden(&a.golden)?;
    let summary = summary_only(&a.common, &golden)?;
    let context = crate::progress::context(false);
    let opts =
        check_options(&a.common, &policy, floor, baseline.as_ref(), summary.as_ref(), &context);
    let site_map = a.msprobe_map.as_deref().map(site_map).transpose()?;
    let naming = Naming { key_map: a.map.as_deref(), site_map: site_map.as_ref() };
    let candidate = Candidate::open(&a.candidate, naming, &golden.manifest)?;
    let report = pipeline::check(&golden, &candidate, None, &opts)?;
    finish(report, &a.common, &policy)
}
