//! `parity compare GOLDEN CANDIDATE`: judge a port's dump (or an msprobe dump) against
//! the golden.

use std::process::ExitCode;

use llama_parity::dump::{guard, Dump};
use llama_parity::pipeline;
use llama_parity::weights::keymap::KeyMap;
use llama_parity::Result;

use crate::args::CompareArgs;
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
    let golden = if llama_parity::dump::msprobe::is_msprobe_dump(&a.golden) {
        crate::import::open_msprobe_golden(&a.golden)?
    } else {
        Dump::open(&a.golden)?
    };
    let summary = summary_only(&a.common, &golden)?;
    let context = crate::progress::context(false);
    let opts =
        check_options(&a.common, &policy, floor, baseline.as_ref(), summary.as_ref(), &context);
    if llama_parity::dump::msprobe::is_msprobe_dump(&a.candidate) {
        return crate::import::compare_msprobe(&a, &golden, &opts);
    }
    let mut candidate = Dump::open(&a.candidate)?;
    if let Some(p) = &a.map {
        let map = KeyMap::load(p)?;
        candidate = candidate.rename_sites(|name| map.to_hf(name))?;
    }
    let report = pipeline::check(&golden, &candidate, None, &opts)?;
    finish(report, &a.common)
}
