//! msprobe's `dump.json` is JSON with Python's non-standard number tokens (`NaN`,
//! `Infinity`, `-Infinity`) where a statistic is not finite. They are rewritten to
//! strings outside string literals before `serde_json` parses the text; [`number`]
//! reads a statistic back from either form.

use serde_json::Value;

/// `text` with every bare `NaN`, `Infinity` and `-Infinity` token (outside strings)
/// replaced by the JSON string of the same spelling.
pub fn quote_nonfinite(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 64);
    let mut i = 0;
    let mut last = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        // Bytes, not `&text[i..]`: `i` may fall inside a multi-byte character.
        let rest = &b[i..];
        let tok =
            ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t.as_bytes()));
        if let Some(t) = tok {
            out.push_str(&text[last..i]);
            out.push('"');
            out.push_str(t);
            out.push('"');
            i += t.len();
            last = i;
            continue;
        }
        i += 1;
    }
    out.push_str(&text[last..]);
    out
}

/// A statistic: a JSON number, or one of the strings `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" | "inf" => Some(f64::INFINITY),
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_tokens_are_quoted_outside_strings_only() {
        let t = r#"{"Max": Infinity, "Min": -Infinity, "Mean": NaN, "name": "NaN Infinity", "x": [1, NaN]}"#;
        let v: Value = serde_json::from_str(&quote_nonfinite(t)).unwrap();
        assert_eq!(number(&v["Max"]), Some(f64::INFINITY));
        assert_eq!(number(&v["Min"]), Some(f64::NEG_INFINITY));
        assert!(number(&v["Mean"]).unwrap().is_nan());
        assert_eq!(v["name"], "NaN Infinity");
        assert!(number(&v["x"][1]).unwrap().is_nan());
    }

    /// Regression (defect 10 of the hardening issue): a multi-byte character outside a
    /// string (a byte order mark) made the scan slice inside it and panic.
    #[test]
    fn multi_byte_characters_outside_strings_are_passed_through() {
        let t = "\u{feff}{\"a\": NaN, \u{e9}: 1}";
        let q = quote_nonfinite(t);
        assert_eq!(q, "\u{feff}{\"a\": \"NaN\", \u{e9}: 1}");
    }

    #[test]
    fn escaped_quotes_keep_string_state() {
        let t = r#"{"a": "say \"NaN\"", "b": NaN}"#;
        let v: Value = serde_json::from_str(&quote_nonfinite(t)).unwrap();
        assert_eq!(v["a"], "say \"NaN\"");
        assert!(number(&v["b"]).unwrap().is_nan());
    }
}
