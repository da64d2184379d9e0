//! The report files of a synthetic comparison: all four written, byte-identical from
//! run to run, and consistent with one another (counts, first divergence, per-token
//! and per-head data in report.json).

use crate::helpers::synthetic;

use llama_parity::compare::Status;
use llama_parity::report::Report;

const FILES: [&str; 4] = ["report.json", "report.html", "junit.xml", "summary.md"];

#[test]
fn write_gives_four_files_and_no_temporaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    synthetic::fail_report().write(dir.path()).expect("write");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = FILES.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "exactly the four report files, no temporaries left behind");
}

#[test]
fn same_inputs_give_byte_identical_files() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    // Two independent comparisons of the same dumps, not one report written twice.
    synthetic::fail_report().write(a.path()).expect("write a");
    synthetic::fail_report().write(b.path()).expect("write b");
    for f in FILES {
        let (x, y) =
            (std::fs::read(a.path().join(f)).expect(f), std::fs::read(b.path().join(f)).expect(f));
        assert!(x == y, "{f} differs between two identical runs");
        let text = String::from_utf8(x).expect("utf-8");
        for dir in [a.path(), b.path(), std::env::temp_dir().as_path()] {
            assert!(
                !text.contains(&*dir.to_string_lossy()),
                "{f} holds the absolute path {}",
                dir.display()
            );
        }
    }
}

#[test]
fn report_json_carries_per_token_per_head_and_histogram_and_round_trips() {
    let r = synthetic::fail_report();
    let back: Report = serde_json::from_str(&r.to_json()).expect("report.json parses");
    // serde_json may round the last digit of a float on the way back; compare the rest.
    assert_eq!(
        (back.verdict, back.summary, back.sites.len()),
        (r.verdict, r.summary, r.sites.len())
    );
    for (a, b) in back.sites.iter().zip(&r.sites) {
        assert_eq!((&a.step, &a.site, a.status), (&b.step, &b.site, b.status));
        assert_eq!(a.per_token.as_ref().map(Vec::len), b.per_token.as_ref().map(Vec::len));
        assert_eq!(a.per_head.as_ref().map(Vec::len), b.per_head.as_ref().map(Vec::len));
        assert_eq!(a.abs_histogram, b.abs_histogram);
    }
    let q = r
        .sites
        .iter()
        .find(|e| {
            e.step.to_string() == "prefill"
                && e.site.to_string() == "model.layers.0.self_attn.q_rope"
        })
        .expect("q_rope");
    assert_eq!(q.per_token.as_ref().map(Vec::len), Some(6), "one value per prefill token");
    assert_eq!(q.per_head.as_ref().map(Vec::len), Some(4), "one value per query head");
    let k = r
        .sites
        .iter()
        .find(|e| {
            e.step.to_string() == "decode.0"
                && e.site.to_string() == "model.layers.0.self_attn.k_rope"
        })
        .expect("k_rope");
    assert_eq!(k.per_head.as_ref().map(Vec::len), Some(2), "k_rope has the KV heads");
    let ctx = r
        .sites
        .iter()
        .find(|e| {
            e.step.to_string() == "decode.1"
                && e.site.to_string() == "model.layers.1.self_attn.context"
        })
        .expect("context");
    let heads = ctx.per_head.as_ref().expect("context split into heads");
    assert_eq!(heads.len(), 4);
    assert!(heads[3] > heads[0] * 2.0, "the planted error grows with the head: {heads:?}");
    let fd = r.first_divergence.as_ref().expect("a divergence");
    assert_eq!(
        (fd.step.to_string(), fd.site.to_string()),
        ("decode.0".into(), "model.rotary_emb.cos".into())
    );
    let h = fd.abs_histogram.as_ref().expect("histogram at the first divergence");
    assert_eq!(h.total(), 2 * 4, "every element of [2, 1, 4] counted");
    assert!(
        r.sites.iter().filter(|e| e.status == Status::Pass).all(|e| e.abs_histogram.is_none()),
        "histograms only where a site fails"
    );
}

#[test]
fn junit_and_markdown_agree_with_the_report() {
    let r = synthetic::fail_report();
    let xml = llama_parity::report::render_junit(&r);
    let s = r.summary;
    assert!(xml.contains(&format!(
        "tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\"",
        r.sites.len(),
        s.fail,
        s.missing + s.skipped
    )));
    assert_eq!(xml.matches("<testcase ").count(), r.sites.len());
    assert_eq!(xml.matches("<failure ").count(), s.fail);
    assert_eq!(xml.matches("<skipped ").count(), s.missing + s.skipped);
    assert!(xml.contains("<testcase classname=\"decode.2\" name=\"model.layers.1.self_attn.v_cache\" time=\"0\">\n      <skipped message=\"the candidate did not dump this site\"/>"));
    assert!(
        xml.contains("&lt;but&gt; not all equal to row 0 &amp; vary"),
        "diagnosis text is escaped in the failure body"
    );
    let md = llama_parity::report::render_markdown(&r);
    assert!(md.starts_with("## Parity: **FAIL**"));
    assert!(md.contains("**First divergence:** `decode.0` `model.rotary_emb.cos`"));
    assert!(md.contains(&format!("Sites: {} pass, {} fail, 1 missing, 0 skipped.", s.pass, s.fail)));
    assert!(md.contains("- `rope.pos_reset` (score 0.94)"));
}

#[test]
fn a_passing_report_says_so_everywhere() {
    let r = synthetic::pass_report();
    assert_eq!(r.summary.fail, 0);
    let md = llama_parity::report::render_markdown(&r);
    assert!(
        md.starts_with("## Parity: **PASS**")
            && md.contains("Every checked site is within tolerance.")
    );
    let xml = llama_parity::report::render_junit(&r);
    assert!(xml.contains("failures=\"0\"") && !xml.contains("<failure"));
    let html = llama_parity::report::render_html(&r).expect("html");
    assert!(html.contains("<div class=\"word\">PASS</div>"));
}
