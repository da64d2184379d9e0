//! Reports: `report.json` for tools and CI.
