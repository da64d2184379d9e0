//! The HTML report in a real browser: headless Chromium renders `report.html` of a
//! synthetic failing comparison; the verdict and every chart must be in the rendered
//! DOM, a screenshot must come out, and the page must ask for nothing over the
//! network (checked in the file and in Chromium's net log).
//!
//! Needs `/usr/bin/chromium` (`apt-get install -y chromium`); PARITY_SKIP_BROWSER=1
//! skips it where no browser can be installed.

use crate::helpers::chromium;
use crate::helpers::synthetic;

const CHART_IDS: [&str; 5] = [
    "chart-compute-order",
    "chart-per-token",
    "chart-head-heatmap",
    "chart-abs-histogram",
    "chart-local-inherited",
];

/// Every `src=`, `href=`, `url(`, `@import` target in `html` that is not a fragment.
fn external_references(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut found = Vec::new();
    for needle in [
        "src=",
        "href=",
        "url(",
        "@import",
        "xlink:href=",
        "srcset=",
        "action=",
        "<link",
        "<script",
        "<iframe",
        "<object",
        "<embed",
    ] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(needle) {
            let start = from + at;
            let rest: String = lower[start + needle.len()..].chars().take(120).collect();
            let target = rest.trim_start_matches(['"', '\'', ' ']);
            let local = target.starts_with('#');
            if !local {
                found.push(format!("{needle}{}", rest.chars().take(60).collect::<String>()));
            }
            from = start + needle.len();
        }
    }
    found
}

#[test]
fn report_html_renders_in_chromium_with_every_chart_and_no_network() {
    let Some(browser) = chromium::find("report_browser") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let report = synthetic::fail_report();
    report.write(dir.path()).expect("write report");
    let page = dir.path().join("report.html");
    let html = std::fs::read_to_string(&page).expect("report.html");

    // Static: nothing in the file points anywhere but inside itself.
    let refs = external_references(&html);
    assert!(refs.is_empty(), "report.html references outside resources: {refs:?}");
    assert!(!html.contains("<script"), "report.html must not need JavaScript");

    // Rendered DOM, with a net log of every request the page made.
    let (dom, asked) = chromium::dom_and_page_requests(&browser, &page);
    assert!(asked.is_empty(), "the page asked the network for {asked:?}");
    assert!(
        dom.contains(
            "<header class=\"verdict fail\" id=\"verdict\"><div class=\"word\">FAIL</div>"
        ),
        "verdict missing from the DOM"
    );
    assert!(
        dom.contains("First divergence")
            && dom.contains("decode.0")
            && dom.contains("model.rotary_emb.cos")
    );
    assert!(dom.contains("rope.pos_reset"), "diagnosis missing from the DOM");
    for id in CHART_IDS {
        let at = dom
            .find(&format!("<svg id=\"{id}\""))
            .unwrap_or_else(|| panic!("chart {id} missing from the DOM"));
        let end = dom[at..]
            .find("</svg>")
            .map(|e| at + e)
            .unwrap_or_else(|| panic!("chart {id} not closed"));
        assert!(
            dom[at..end].matches("<rect").count() + dom[at..end].matches("<polyline").count() > 3,
            "chart {id} is empty"
        );
        let fig = &dom[..at];
        assert!(
            fig.rfind("<figure").is_some_and(|f| !fig[f..].contains("</figure>")),
            "chart {id} is not inside a figure"
        );
    }
    assert_eq!(dom.matches("<figcaption>").count(), CHART_IDS.len());

    // A screenshot comes out and is a PNG of some substance.
    let png = dir.path().join("shot.png");
    chromium::screenshot(&browser, &page, &png, 1280, 2400);
    let bytes = std::fs::read(&png).expect("no screenshot written");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000,
        "screenshot too small: {} bytes",
        bytes.len()
    );
}

#[test]
fn passing_report_renders_in_chromium() {
    let Some(browser) = chromium::find("report_browser") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    synthetic::pass_report().write(dir.path()).expect("write report");
    let (dom, asked) = chromium::dom_and_page_requests(&browser, &dir.path().join("report.html"));
    assert!(asked.is_empty(), "the page asked the network for {asked:?}");
    assert!(dom.contains("<div class=\"word\">PASS</div>"));
    assert!(
        dom.contains("<svg id=\"chart-compute-order\"")
            && dom.contains("<svg id=\"chart-per-token\"")
    );
    assert!(!dom.contains("chart-abs-histogram"), "no divergence, no histogram");
    assert!(!dom.contains("chart-local-inherited"), "no teacher forcing, no local chart");
}

/// The network check must be able to fail: a page that loads an image and a CSS
/// background from outside is caught, statically and in the net log.
#[test]
fn network_checks_catch_a_page_that_fetches() {
    let Some(browser) = chromium::find("report_browser") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("leaky.html");
    let html = "<!DOCTYPE html><html><head><style>body { background: url(https://example.invalid/bg.png) }</style></head>\
                <body><img src=\"http://example.invalid/x.png\"><a href=\"#top\">top</a></body></html>";
    std::fs::write(&page, html).expect("write page");
    let refs = external_references(html);
    assert_eq!(refs.len(), 2, "{refs:?}");
    let (_, asked) = chromium::dom_and_page_requests(&browser, &page);
    assert!(asked.iter().any(|u| u.contains("example.invalid/x.png")), "{asked:?}");
    assert!(asked.iter().any(|u| u.contains("example.invalid/bg.png")), "{asked:?}");
}
