//! What a golden is compared with: a [`Candidate`], opened from a path by its layout.
//!
//! Every way the harness knows to read a port's output ends here, so that each command,
//! the suite and the tests compare the same thing the same way:
//!
//! | layout on disk | [`Kind`] | compared as |
//! |---|---|---|
//! | a contract dump (CONTRACT §1) | [`Kind::Contract`] | its tensors |
//! | a contract-layout dump naming sites the port's way, with a key map | [`Kind::KeyMapped`] | its tensors, renamed |
//! | an msprobe tensor-mode dump | [`Kind::MsprobeTensors`] | its tensors, gathered through a site map |
//! | an msprobe statistics-mode dump | [`Kind::MsprobeStatistics`] | each site's Max/Min/Mean/Norm |
//!
//! A layout the harness learns to read later (one dump a rank of a tensor-parallel run,
//! say) is one more [`Kind`] and one more arm of [`Candidate::open`]; what each kind can
//! be judged with is decided once, in [`crate::check`].

use std::collections::BTreeMap;
use std::path::Path;

use contract::error::{Error, Feature, Result};
use contract::site::Step;
use dump::msprobe::{is_msprobe_dump, Mode, MsprobeDump, SiteMap, StatSite};
use dump::{Dump, Manifest};
use weights::keymap::KeyMap;

/// The layout a candidate was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A contract dump, read as it is.
    Contract,
    /// A contract-layout dump whose site names a key map turned into the contract's.
    KeyMapped,
    /// An msprobe tensor-mode dump, gathered through a site map into a contract dump.
    MsprobeTensors,
    /// An msprobe statistics-mode dump: each site known by its statistics alone.
    MsprobeStatistics,
}

/// A candidate known only by each site's statistics (an msprobe statistics-mode dump).
#[derive(Debug, Clone)]
pub struct Statistics {
    /// The model and scenario it was recorded on, its steps cut to those recorded.
    pub manifest: Manifest,
    /// How it is named in messages and reports.
    pub label: String,
    /// Each recorded site's statistics, keyed by step and site name.
    pub sites: BTreeMap<(Step, String), StatSite>,
}

/// How a candidate names its sites, where it does not name them as the contract does.
/// Each applies to one layout; [`Candidate::open`] refuses one given for another.
#[derive(Debug, Clone, Copy, Default)]
pub struct Naming<'a> {
    /// A key map file (`llama-parity/keymap@1`) whose rules give the contract's name as
    /// `hf` and the candidate's as `port`: contract-layout dumps only.
    pub key_map: Option<&'a Path>,
    /// Which msprobe entry holds which site: msprobe dumps only (default: HF's names,
    /// [`SiteMap::hf`]).
    pub site_map: Option<&'a SiteMap>,
}

/// What a golden is compared with.
pub struct Candidate {
    kind: Kind,
    body: Body,
}

enum Body {
    Tensors(Dump),
    Statistics(Statistics),
}

/// A candidate as [`crate::check`] takes it: an opened [`Candidate`], or a contract dump
/// in hand (an implementation's output, a dump a test built).
#[derive(Clone, Copy)]
pub enum CandidateRef<'a> {
    Tensors(&'a Dump),
    Statistics(&'a Statistics),
}

impl<'a> From<&'a Dump> for CandidateRef<'a> {
    fn from(d: &'a Dump) -> CandidateRef<'a> {
        CandidateRef::Tensors(d)
    }
}

impl<'a> From<&'a Candidate> for CandidateRef<'a> {
    fn from(c: &'a Candidate) -> CandidateRef<'a> {
        match &c.body {
            Body::Tensors(d) => CandidateRef::Tensors(d),
            Body::Statistics(s) => CandidateRef::Statistics(s),
        }
    }
}

impl From<Dump> for Candidate {
    /// A contract dump in hand, compared as it is.
    fn from(dump: Dump) -> Candidate {
        Candidate { kind: Kind::Contract, body: Body::Tensors(dump) }
    }
}

impl Candidate {
    /// Opens the candidate at `path`, recognising its layout: an msprobe dump root
    /// (`step*/<rank*|proc*>/dump.json`) is read through `naming.site_map`, in tensor or
    /// statistics mode as it was recorded; anything else is a contract dump, renamed
    /// through `naming.key_map` when one is given. An msprobe dump takes its model and
    /// scenario from the `manifest.json` beside its step folders, else from `golden`.
    ///
    /// A naming that does not apply to the layout found is refused
    /// ([`Error::Unsupported`] with [`Feature::KeyMap`] or [`Feature::SiteMap`]), never
    /// left unused.
    pub fn open(path: &Path, naming: Naming, golden: &Manifest) -> Result<Candidate> {
        if is_msprobe_dump(path) {
            Self::open_msprobe(path, naming, golden)
        } else {
            Self::open_contract(path, naming)
        }
    }

    fn open_contract(path: &Path, naming: Naming) -> Result<Candidate> {
        if naming.site_map.is_some() {
            return Err(Error::unsupported(
                Feature::SiteMap,
                format!(
                    "{} is not an msprobe dump (no step*/rank*/dump.json): a site map reads msprobe dumps only",
                    path.display()
                ),
            ));
        }
        // A contract dump written per tensor-parallel rank (`rank<R>/`) is put back
        // together from its ranks.
        let dump = if dump::ranked::is_ranked_dump(path) {
            dump::ranked::open(path)?
        } else {
            Dump::open(path)?
        };
        let Some(map_path) = naming.key_map else {
            return Ok(Candidate::from(dump));
        };
        let map = KeyMap::load(map_path)?;
        let renamed = dump.rename_sites(|name| map.to_hf(name))?;
        Ok(Candidate { kind: Kind::KeyMapped, body: Body::Tensors(renamed) })
    }

    fn open_msprobe(path: &Path, naming: Naming, golden: &Manifest) -> Result<Candidate> {
        if naming.key_map.is_some() {
            return Err(Error::unsupported(
                Feature::KeyMap,
                format!(
                    "{} is an msprobe dump: its entries are found through a site map, not renamed by a key map",
                    path.display()
                ),
            ));
        }
        let hf;
        let map = match naming.site_map {
            Some(m) => m,
            None => {
                hf = SiteMap::hf();
                &hf
            }
        };
        let like = match manifest_beside(path)? {
            Some(m) => {
                compare::same_inputs(&golden.scenario, &m.scenario, &path.join("manifest.json"))?;
                m
            }
            None => golden.clone(),
        };
        let ms = MsprobeDump::open(path, map)?;
        Ok(match ms.mode() {
            Mode::Tensor => Candidate {
                kind: Kind::MsprobeTensors,
                body: Body::Tensors(ms.to_dump(map, &like)?),
            },
            Mode::Statistics => {
                let (sites, manifest) = ms.statistics_with_manifest(map, &like)?;
                Candidate {
                    kind: Kind::MsprobeStatistics,
                    body: Body::Statistics(Statistics {
                        manifest,
                        label: format!("msprobe statistics dump {}", path.display()),
                        sites,
                    }),
                }
            }
        })
    }

    /// The layout it was read from.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Its tensors as a contract dump; `None` for a statistics-only candidate.
    pub fn dump(&self) -> Option<&Dump> {
        match &self.body {
            Body::Tensors(d) => Some(d),
            Body::Statistics(_) => None,
        }
    }

    /// Its statistics; `None` for a candidate with tensors.
    pub fn statistics(&self) -> Option<&Statistics> {
        match &self.body {
            Body::Tensors(_) => None,
            Body::Statistics(s) => Some(s),
        }
    }
}

/// Opens a golden: a contract dump, or an msprobe tensor dump of HF transformers' run
/// (read with the `hf` site map) with the run's `manifest.json` beside its step folders.
pub fn open_golden(path: &Path) -> Result<Dump> {
    if !is_msprobe_dump(path) {
        return Dump::open(path);
    }
    let Some(like) = manifest_beside(path)? else {
        return Err(Error::format(
            path,
            "an msprobe dump given as the golden needs the run's manifest.json beside its step folders",
        ));
    };
    let map = SiteMap::hf();
    let ms = MsprobeDump::open(path, &map)?;
    if ms.mode() == Mode::Statistics {
        return Err(Error::format(
            path,
            "a statistics-mode msprobe dump cannot be the golden: it holds no tensors",
        ));
    }
    ms.to_dump(&map, &like)
}

/// The `manifest.json` beside an msprobe dump's step folders, if there is one.
pub fn manifest_beside(root: &Path) -> Result<Option<Manifest>> {
    let beside = root.join("manifest.json");
    if beside.is_file() {
        Manifest::load(&beside).map(Some)
    } else {
        Ok(None)
    }
}
