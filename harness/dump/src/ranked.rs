//! A contract dump written per tensor-parallel rank: `DUMP/rank0/`, `DUMP/rank1/`, ...
//! each a contract dump (CONTRACT §1) of the same run with the same manifest, each
//! holding its rank's tensors. Put back together site by site as a multi-rank msprobe
//! dump is ([`crate::msprobe::ranks`]): replicated, concatenated along the axis that
//! makes the contract's shape, partial sums added, a site one rank alone holds (a
//! pipeline stage) taken from it, and ranks that disagree where they should be
//! identical recorded as a rank divergence.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use contract::error::{Error, Result};
use contract::site::Site;

use crate::msprobe::ranks;
use crate::{Dump, Tensor};

/// The `rank<R>` folders of `dir` holding a `manifest.json`, by rank number.
fn rank_dirs(dir: &Path) -> Vec<(Option<usize>, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(Option<usize>, PathBuf)> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let id = name.strip_prefix("rank")?;
            Some((id.parse().ok(), p))
        })
        .collect();
    out.sort();
    out
}

/// True when `dir` is a contract dump written per rank: no `manifest.json` of its own,
/// and `rank<R>/manifest.json` inside.
pub fn is_ranked_dump(dir: &Path) -> bool {
    !dir.join("manifest.json").exists() && !rank_dirs(dir).is_empty()
}

/// Opens the per-rank contract dump `dir` as one dump: every rank opened and checked
/// to carry rank 0's manifest, each site of each step put back together from the ranks
/// that hold it; its producer records the number of ranks and each site's kind.
pub fn open(dir: &Path) -> Result<Dump> {
    let dirs = rank_dirs(dir);
    let k = dirs.len();
    if k == 0 {
        return Err(Error::format(dir, "no rank<R>/manifest.json: not a dump written per rank"));
    }
    if dirs.iter().enumerate().any(|(i, (id, _))| *id != Some(i)) {
        return Err(Error::format(
            dir,
            format!("{k} rank folders, not numbered rank0..rank{}", k.saturating_sub(1)),
        ));
    }
    let dumps = dirs.iter().map(|(_, d)| Dump::open(d)).collect::<Result<Vec<Dump>>>()?;
    let m0 = &dumps[0].manifest;
    for ((_, d), dump) in dirs.iter().zip(&dumps).skip(1) {
        let m = &dump.manifest;
        let what = if m.model != m0.model {
            Some("model")
        } else if m.scenario != m0.scenario {
            Some("scenario")
        } else if m.dtype != m0.dtype {
            Some("dtype")
        } else if m.steps != m0.steps {
            Some("steps")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(Error::format(
                d.join("manifest.json"),
                format!("its {what} differs from rank0/manifest.json's: the ranks of one dump share one manifest"),
            ));
        }
    }
    let dims = m0.shape_dims();
    let mut tensors = BTreeMap::new();
    let mut how = BTreeMap::new();
    for &step in &m0.steps {
        let mut sites: Vec<&Site> = dumps.iter().flat_map(|d| d.sites(step)).collect();
        sites.sort_by_key(|s| s.to_string());
        sites.dedup();
        for site in sites {
            let mut parts: Vec<(usize, PathBuf, Tensor)> = Vec::new();
            for (r, ((_, d), dump)) in dirs.iter().zip(&dumps).enumerate() {
                if let Some(t) = dump.get(step, site)? {
                    parts.push((r, d.clone(), t));
                }
            }
            let want = site.shape(step, &dims);
            let fits = |s: &[usize]| s == want.as_slice();
            let vocab = Some(m0.model.vocab_size);
            let (t, h) = ranks::tensors(parts, k, site, &fits, vocab)?;
            tensors.insert(format!("{step}/{site}"), t);
            how.insert(format!("{step}/{site}"), h);
        }
    }
    let mut manifest = m0.clone();
    if !manifest.producer.is_object() {
        manifest.producer = serde_json::json!({ "producer": manifest.producer });
    }
    manifest.producer["ranks"] = serde_json::Value::from(k);
    crate::msprobe::record_reassembly(&mut manifest, &how);
    let mut out = Dump::in_memory_from(manifest, tensors, dir)?;
    out.set_name(format!("{} ({k} ranks)", dir.display()));
    Ok(out)
}
