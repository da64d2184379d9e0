//! What a candidate recorded over tensor-parallel ranks says of its ranks, brought into
//! the comparison and the report: the candidate's producer records, per `step/site`,
//! how the site's ranks were put back together (`reassembly`), which ranks disagree
//! where they should hold the same tensor (`rank_divergence`) and what a statistics
//! merge could not give (`reassembly_inexact`) ([`dump::msprobe::ranks`]).

use compare::{Comparison, Status};
use report::Report;
use serde_json::Value;

fn lookup<'a>(producer: &'a Value, field: &str, key: &str) -> Option<&'a str> {
    producer.get(field)?.get(key)?.as_str()
}

/// Each site whose ranks diverge fails, its note naming the ranks: a finding in itself,
/// whatever its tensor (the majority's) measured.
pub(crate) fn fail_divergent_ranks(cmp: &mut Comparison) {
    let producer = cmp.candidate_producer.clone();
    if producer.get("rank_divergence").is_none() {
        return;
    }
    for r in &mut cmp.sites {
        let key = format!("{}/{}", r.step, r.site);
        let Some(text) = lookup(&producer, "rank_divergence", &key) else { continue };
        r.status = Status::Fail;
        r.note = Some(match &r.note {
            Some(n) => format!("{text}; {n}"),
            None => text.to_string(),
        });
    }
}

/// Whether the first divergence of `cmp` is a rank divergence (no fault hypothesis of a
/// single-device model explains ranks that disagree).
pub(crate) fn first_is_rank_divergence(cmp: &Comparison) -> bool {
    cmp.first_divergence().is_some_and(|r| {
        lookup(&cmp.candidate_producer, "rank_divergence", &format!("{}/{}", r.step, r.site))
            .is_some()
    })
}

/// Each site of the report gets how its ranks were put back together, and a statistics
/// merge that is not exact says so in its note.
pub(crate) fn annotate(report: &mut Report) {
    let producer = report.candidate_producer.clone();
    if producer.get("reassembly").is_none() {
        return;
    }
    let entries = report.sites.iter_mut().chain(report.first_divergence.as_mut());
    for e in entries {
        let key = format!("{}/{}", e.step, e.site);
        e.reassembly = lookup(&producer, "reassembly", &key).map(str::to_string);
        if let Some(text) = lookup(&producer, "reassembly_inexact", &key) {
            if !e.note.as_deref().is_some_and(|n| n.contains(text)) {
                e.note = Some(match &e.note {
                    Some(n) => format!("{n}; {text}"),
                    None => text.to_string(),
                });
            }
        }
    }
}
