//! The rules of `mayfly::id`, checked against the SPIFFE ID specification
//! (spiffe/spiffe `standards/SPIFFE-ID.md`, sections 2.1 to 2.3) and DESIGN.md "Scope in the SVID".
//!
//! Tables put a valid input next to the invalid one for each rule and name the exact
//! [`IdError`] expected, so a change in which rule fires (or in the text it reports) shows up.

use std::collections::BTreeSet;

use mayfly::id::{
    IdError, MAX_SCOPE_TOKEN_LEN, MAX_SCOPE_TOKENS, MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, Scope,
    ScopeSet, ScopedId, SpiffeId, TrustDomain, parse_scopes,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap_or_else(|e| panic!("{s:?} should be a trust domain: {e}"))
}

fn scope(s: &str) -> Scope {
    Scope::parse(s).unwrap_or_else(|e| panic!("{s:?} should be a scope: {e}"))
}

fn scopes(items: &[&str]) -> ScopeSet {
    parse_scopes(items).unwrap_or_else(|e| panic!("{items:?} should be scopes: {e}"))
}

/// A trust domain name of exactly `n` bytes (dotted labels, like a real one).
fn td_name_of_len(n: usize) -> String {
    let name: String = "abcdefghi.".chars().cycle().take(n).collect();
    // Keep the last byte a letter so the name looks ordinary (any of [a-z0-9.-_] is legal).
    let mut name = name.into_bytes();
    if let Some(last) = name.last_mut() {
        *last = b'z';
    }
    String::from_utf8(name).unwrap()
}

/// A SPIFFE ID of exactly `n` bytes in `acme.test` (`n` >= 21): 63-byte segments, then a shorter
/// last one.
fn id_of_len(n: usize) -> String {
    let mut s = String::from("spiffe://acme.test");
    while s.len() < n {
        let room = n - s.len() - 1; // bytes left after the next '/'
        // Never leave exactly one byte, which could not hold another "/x".
        let take = if room > 63 && room - 63 < 2 {
            61
        } else {
            room.min(63)
        };
        s.push('/');
        s.extend(std::iter::repeat_n('x', take));
    }
    assert_eq!(s.len(), n, "id_of_len({n}) built {} bytes", s.len());
    s
}

/// One row of a table: a rule, an input and what must happen.
struct Case<T> {
    rule: &'static str,
    input: String,
    want: Result<T, IdError>,
}

fn ok<T>(rule: &'static str, input: impl Into<String>, value: T) -> Case<T> {
    Case {
        rule,
        input: input.into(),
        want: Ok(value),
    }
}

fn bad<T>(rule: &'static str, input: impl Into<String>, err: IdError) -> Case<T> {
    Case {
        rule,
        input: input.into(),
        want: Err(err),
    }
}

/// Runs every row and reports all the rows that failed at once.
fn run_table<T>(
    label: &str,
    cases: Vec<Case<T>>,
    mut check: impl FnMut(&str, &Result<T, IdError>) -> Result<(), String>,
) {
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(why) = check(&case.input, &case.want) {
            let shown: String = if case.input.len() > 80 {
                format!("<{} bytes> {}…", case.input.len(), &case.input[..60])
            } else {
                case.input.clone()
            };
            failures.push(format!("  [{}] {shown:?}: {why}", case.rule));
        }
    }
    assert!(
        failures.is_empty(),
        "{label}: {} of {} rows failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 1. SpiffeId::parse, rule by rule
// ---------------------------------------------------------------------------------------------

/// Expected on success: (trust domain name, path).
type Parts = (&'static str, &'static str);

fn spiffe_id_cases() -> Vec<Case<Option<Parts>>> {
    use IdError::*;
    let td255 = td_name_of_len(MAX_TRUST_DOMAIN_LEN);
    let td256 = td_name_of_len(MAX_TRUST_DOMAIN_LEN + 1);
    vec![
        // Empty input.
        ok(
            "non-empty",
            "spiffe://acme.test/a",
            Some(("acme.test", "/a")),
        ),
        bad("non-empty", "", Empty),
        // Scheme: exactly `spiffe://`, lowercase, never normalised.
        ok("scheme", "spiffe://acme.test/a", Some(("acme.test", "/a"))),
        bad(
            "scheme",
            "SPIFFE://acme.test/a",
            WrongScheme("SPIFFE://acme.test/a".into()),
        ),
        bad(
            "scheme",
            "Spiffe://acme.test/a",
            WrongScheme("Spiffe://acme.test/a".into()),
        ),
        bad(
            "scheme",
            "https://acme.test/a",
            WrongScheme("https://acme.test/a".into()),
        ),
        bad(
            "scheme",
            "spiffe:/acme.test/a",
            WrongScheme("spiffe:/acme.test/a".into()),
        ),
        bad(
            "scheme",
            "spiffe:acme.test/a",
            WrongScheme("spiffe:acme.test/a".into()),
        ),
        bad("scheme", "acme.test/a", WrongScheme("acme.test/a".into())),
        bad(
            "scheme",
            " spiffe://acme.test/a",
            WrongScheme(" spiffe://acme.test/a".into()),
        ),
        // Trust domain present.
        ok(
            "trust domain present",
            "spiffe://acme.test",
            Some(("acme.test", "")),
        ),
        bad(
            "trust domain present",
            "spiffe://",
            MissingTrustDomain("spiffe://".into()),
        ),
        bad(
            "trust domain present",
            "spiffe:///a",
            MissingTrustDomain("spiffe:///a".into()),
        ),
        // Trust domain characters: [a-z0-9.-_] only.
        ok(
            "trust domain chars",
            "spiffe://a-b_c.0-9.test/a",
            Some(("a-b_c.0-9.test", "/a")),
        ),
        ok(
            "trust domain chars (IPv4 is allowed)",
            "spiffe://127.0.0.1/a",
            Some(("127.0.0.1", "/a")),
        ),
        bad(
            "trust domain uppercase (not lowercased)",
            "spiffe://Acme.test/a",
            BadTrustDomainChar("Acme.test".into()),
        ),
        bad(
            "trust domain uppercase (not lowercased)",
            "spiffe://ACME.TEST",
            BadTrustDomainChar("ACME.TEST".into()),
        ),
        bad(
            "no port",
            "spiffe://acme.test:8080/a",
            BadTrustDomainChar("acme.test:8080".into()),
        ),
        bad(
            "no ':' at all",
            "spiffe://acme.test:/a",
            BadTrustDomainChar("acme.test:".into()),
        ),
        bad(
            "no userinfo",
            "spiffe://user@acme.test/a",
            BadTrustDomainChar("user@acme.test".into()),
        ),
        bad(
            "no userinfo",
            "spiffe://user:pw@acme.test/a",
            BadTrustDomainChar("user:pw@acme.test".into()),
        ),
        bad(
            "no percent-encoding in trust domain",
            "spiffe://acme%2Etest/a",
            BadTrustDomainChar("acme%2Etest".into()),
        ),
        bad(
            "no IPv6",
            "spiffe://[::1]/a",
            BadTrustDomainChar("[::1]".into()),
        ),
        bad(
            "no query after trust domain",
            "spiffe://acme.test?x=1",
            BadTrustDomainChar("acme.test?x=1".into()),
        ),
        bad(
            "no fragment after trust domain",
            "spiffe://acme.test#f",
            BadTrustDomainChar("acme.test#f".into()),
        ),
        bad(
            "trust domain ASCII only",
            "spiffe://acmé.test/a",
            BadTrustDomainChar("acmé.test".into()),
        ),
        bad(
            "trust domain no space",
            "spiffe://acme test/a",
            BadTrustDomainChar("acme test".into()),
        ),
        // Trust domain length: 255 bytes.
        ok(
            "trust domain <= 255 bytes",
            format!("spiffe://{td255}/a"),
            None,
        ),
        bad(
            "trust domain <= 255 bytes",
            format!("spiffe://{td256}/a"),
            TrustDomainTooLong(256),
        ),
        bad(
            "trust domain <= 255 bytes",
            format!("spiffe://{td256}"),
            TrustDomainTooLong(256),
        ),
        // Path characters: [a-zA-Z0-9.-_], path is case-sensitive.
        ok(
            "path chars",
            "spiffe://acme.test/AZaz09.-_/x",
            Some(("acme.test", "/AZaz09.-_/x")),
        ),
        bad(
            "no percent-encoding",
            "spiffe://acme.test/a%20b",
            BadPathChar("spiffe://acme.test/a%20b".into()),
        ),
        bad(
            "no percent-encoding",
            "spiffe://acme.test/%2e%2e",
            BadPathChar("spiffe://acme.test/%2e%2e".into()),
        ),
        bad(
            "no query",
            "spiffe://acme.test/a?x=1",
            BadPathChar("spiffe://acme.test/a?x=1".into()),
        ),
        bad(
            "no query",
            "spiffe://acme.test/a/?x",
            BadPathChar("spiffe://acme.test/a/?x".into()),
        ),
        bad(
            "no fragment",
            "spiffe://acme.test/a#f",
            BadPathChar("spiffe://acme.test/a#f".into()),
        ),
        bad(
            "path chars",
            "spiffe://acme.test/a b",
            BadPathChar("spiffe://acme.test/a b".into()),
        ),
        bad(
            "path chars",
            "spiffe://acme.test/a:b",
            BadPathChar("spiffe://acme.test/a:b".into()),
        ),
        bad(
            "path chars",
            "spiffe://acme.test/a@b",
            BadPathChar("spiffe://acme.test/a@b".into()),
        ),
        bad(
            "path chars",
            "spiffe://acme.test/a\\b",
            // Held escaped (a backslash is doubled), so the error is safe to log or print.
            BadPathChar("spiffe://acme.test/a\\\\b".into()),
        ),
        bad(
            "path chars",
            "spiffe://acme.test/a+b",
            BadPathChar("spiffe://acme.test/a+b".into()),
        ),
        bad(
            "path chars",
            "spiffe://acme.test/a~b",
            BadPathChar("spiffe://acme.test/a~b".into()),
        ),
        bad(
            "path ASCII only",
            "spiffe://acme.test/café",
            BadPathChar("spiffe://acme.test/café".into()),
        ),
        bad(
            "path no control chars",
            "spiffe://acme.test/a\n",
            BadPathChar("spiffe://acme.test/a\\n".into()),
        ),
        // No empty segments, no trailing slash.
        ok(
            "no empty segment",
            "spiffe://acme.test/a/b",
            Some(("acme.test", "/a/b")),
        ),
        bad(
            "no empty segment",
            "spiffe://acme.test/a//b",
            EmptySegment("spiffe://acme.test/a//b".into()),
        ),
        bad(
            "no empty segment",
            "spiffe://acme.test//a",
            EmptySegment("spiffe://acme.test//a".into()),
        ),
        bad(
            "no trailing slash",
            "spiffe://acme.test/a/",
            EmptySegment("spiffe://acme.test/a/".into()),
        ),
        bad(
            "no trailing slash",
            "spiffe://acme.test/",
            EmptySegment("spiffe://acme.test/".into()),
        ),
        // No '.' or '..' segments; other dotted segments are fine.
        ok(
            "dot segments",
            "spiffe://acme.test/.../a",
            Some(("acme.test", "/.../a")),
        ),
        ok(
            "dot segments",
            "spiffe://acme.test/.a",
            Some(("acme.test", "/.a")),
        ),
        ok(
            "dot segments",
            "spiffe://acme.test/a./..b/b..",
            Some(("acme.test", "/a./..b/b..")),
        ),
        bad(
            "dot segments",
            "spiffe://acme.test/./a",
            DotSegment("spiffe://acme.test/./a".into()),
        ),
        bad(
            "dot segments",
            "spiffe://acme.test/a/..",
            DotSegment("spiffe://acme.test/a/..".into()),
        ),
        bad(
            "dot segments",
            "spiffe://acme.test/a/./b",
            DotSegment("spiffe://acme.test/a/./b".into()),
        ),
        bad(
            "dot segments",
            "spiffe://acme.test/..",
            DotSegment("spiffe://acme.test/..".into()),
        ),
        // Whole ID: at most 2048 bytes.
        ok("id <= 2048 bytes", id_of_len(MAX_SPIFFE_ID_LEN), None),
        bad(
            "id <= 2048 bytes",
            id_of_len(MAX_SPIFFE_ID_LEN + 1),
            TooLong(2049),
        ),
        bad("id <= 2048 bytes", id_of_len(4096), TooLong(4096)),
    ]
}

#[test]
fn spiffe_id_parse_table() {
    run_table("SpiffeId::parse", spiffe_id_cases(), |input, want| {
        let got = SpiffeId::parse(input);
        let via_from_str = input.parse::<SpiffeId>();
        if got != via_from_str {
            return Err(format!("parse {got:?} but from_str {via_from_str:?}"));
        }
        match (want, &got) {
            (Err(want), Err(got)) if want == got => Ok(()),
            (Ok(parts), Ok(parsed)) => {
                if parsed.as_str() != input || parsed.to_string() != input {
                    return Err(format!("accepted but re-formats as {parsed}"));
                }
                if let Some((name, path)) = parts
                    && (parsed.trust_domain_name() != *name || parsed.path() != *path)
                {
                    return Err(format!(
                        "split as ({:?}, {:?}), want ({name:?}, {path:?})",
                        parsed.trust_domain_name(),
                        parsed.path()
                    ));
                }
                // A strict SPIFFE implementation accepts what Mayfly accepts.
                match spiffe::SpiffeId::new(input) {
                    Ok(theirs) if theirs.to_string() == input => Ok(()),
                    other => Err(format!("the spiffe crate disagrees: {other:?}")),
                }
            }
            _ => Err(format!("got {got:?}, want {want:?}")),
        }
    });
}

#[test]
fn spiffe_id_parts_and_case() {
    let a = id("spiffe://acme.test/agents/billing-bot");
    assert_eq!(a.trust_domain_name(), "acme.test");
    assert_eq!(a.trust_domain(), td("acme.test"));
    assert_eq!(a.path(), "/agents/billing-bot");
    assert_eq!(a.segments().collect::<Vec<_>>(), ["agents", "billing-bot"]);
    assert!(!a.is_root());

    let root = id("spiffe://acme.test");
    assert!(root.is_root());
    assert_eq!(root.path(), "");
    assert_eq!(root.segments().count(), 0);
    assert_eq!(root, td("acme.test").id());

    // The path is case-sensitive and kept as written.
    assert_ne!(id("spiffe://acme.test/A"), id("spiffe://acme.test/a"));
    assert_eq!(id("spiffe://acme.test/A").path(), "/A");
}

// ---------------------------------------------------------------------------------------------
// 2. TrustDomain::new and FromStr
// ---------------------------------------------------------------------------------------------

#[test]
fn trust_domain_new_table() {
    use IdError::*;
    let td255 = td_name_of_len(MAX_TRUST_DOMAIN_LEN);
    let td256 = td_name_of_len(MAX_TRUST_DOMAIN_LEN + 1);
    let cases: Vec<Case<String>> = vec![
        ok("bare name", "acme.test", "acme.test".into()),
        ok("bare name", "a", "a".into()),
        ok("chars", "a-b_c.0-9", "a-b_c.0-9".into()),
        ok("IPv4", "10.0.0.1", "10.0.0.1".into()),
        bad("non-empty", "", MissingTrustDomain(String::new())),
        bad(
            "lowercase only",
            "Acme.test",
            BadTrustDomainChar("Acme.test".into()),
        ),
        bad(
            "no port",
            "acme.test:8080",
            BadTrustDomainChar("acme.test:8080".into()),
        ),
        bad(
            "no userinfo",
            "user@acme.test",
            BadTrustDomainChar("user@acme.test".into()),
        ),
        bad(
            "no path",
            "acme.test/a",
            BadTrustDomainChar("acme.test/a".into()),
        ),
        bad(
            "no percent",
            "acme%2etest",
            BadTrustDomainChar("acme%2etest".into()),
        ),
        // `new` takes the bare name only; the scheme form is for `from_str`.
        bad(
            "bare only",
            "spiffe://acme.test",
            BadTrustDomainChar("spiffe://acme.test".into()),
        ),
        ok("<= 255 bytes", td255.clone(), td255.clone()),
        bad("<= 255 bytes", td256.clone(), TrustDomainTooLong(256)),
    ];
    run_table("TrustDomain::new", cases, |input, want| {
        let got = TrustDomain::new(input).map(|t| t.as_str().to_owned());
        if &got == want {
            Ok(())
        } else {
            Err(format!("got {got:?}, want {want:?}"))
        }
    });
}

#[test]
fn trust_domain_from_str_table() {
    use IdError::*;
    let td255 = td_name_of_len(MAX_TRUST_DOMAIN_LEN);
    let td256 = td_name_of_len(MAX_TRUST_DOMAIN_LEN + 1);
    let cases: Vec<Case<String>> = vec![
        ok("bare form", "acme.test", "acme.test".into()),
        ok("spiffe:// form", "spiffe://acme.test", "acme.test".into()),
        bad("bare form non-empty", "", MissingTrustDomain(String::new())),
        bad(
            "spiffe:// form non-empty",
            "spiffe://",
            MissingTrustDomain(String::new()),
        ),
        bad(
            "bare form lowercase",
            "Acme.test",
            BadTrustDomainChar("Acme.test".into()),
        ),
        bad(
            "spiffe:// form lowercase",
            "spiffe://Acme.test",
            BadTrustDomainChar("Acme.test".into()),
        ),
        bad(
            "scheme lowercase",
            "SPIFFE://acme.test",
            BadTrustDomainChar("SPIFFE://acme.test".into()),
        ),
        bad(
            "other scheme",
            "https://acme.test",
            BadTrustDomainChar("https://acme.test".into()),
        ),
        bad(
            "no port",
            "spiffe://acme.test:443",
            BadTrustDomainChar("acme.test:443".into()),
        ),
        // A trust domain is not a workload ID: no path, not even a trailing '/'.
        bad(
            "no path",
            "spiffe://acme.test/a",
            BadTrustDomainChar("acme.test/a".into()),
        ),
        bad(
            "no trailing slash",
            "spiffe://acme.test/",
            BadTrustDomainChar("acme.test/".into()),
        ),
        ok("<= 255 bytes, bare", td255.clone(), td255.clone()),
        ok(
            "<= 255 bytes, spiffe://",
            format!("spiffe://{td255}"),
            td255.clone(),
        ),
        bad("<= 255 bytes, bare", td256.clone(), TrustDomainTooLong(256)),
        bad(
            "<= 255 bytes, spiffe://",
            format!("spiffe://{td256}"),
            TrustDomainTooLong(256),
        ),
    ];
    run_table("TrustDomain::from_str", cases, |input, want| {
        let got = input.parse::<TrustDomain>().map(|t| t.to_string());
        if &got == want {
            Ok(())
        } else {
            Err(format!("got {got:?}, want {want:?}"))
        }
    });
}

#[test]
fn trust_domain_id_and_join() {
    let acme = td("acme.test");
    assert_eq!(acme.id().as_str(), "spiffe://acme.test");
    assert_eq!(acme.id(), id("spiffe://acme.test"));
    assert_eq!(acme.join("").unwrap(), acme.id());
    assert_eq!(
        acme.join("/agents/bot").unwrap(),
        id("spiffe://acme.test/agents/bot")
    );
    assert_eq!(
        acme.join("/a//b"),
        Err(IdError::EmptySegment("spiffe://acme.test/a//b".into()))
    );
    assert_eq!(
        acme.join("/a/.."),
        Err(IdError::DotSegment("spiffe://acme.test/a/..".into()))
    );
    // A path must start with '/': anything else would be glued onto the trust domain name and
    // silently name another trust domain (`acme.test` + `evil/x` = `acme.testevil`).
    for path in [
        "agents/bot",
        "evil/x",
        ".evil.test/x",
        "-x",
        ":8080/a",
        "?x=1",
        "#f",
    ] {
        match acme.join(path) {
            Err(IdError::BadPathChar(_)) => {}
            other => panic!("join({path:?}) must be refused as a bad path, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Scope
// ---------------------------------------------------------------------------------------------

#[test]
fn scope_parse_table() {
    let t64 = "a".repeat(MAX_SCOPE_TOKEN_LEN);
    let t65 = "a".repeat(MAX_SCOPE_TOKEN_LEN + 1);
    let eight = ["t"; MAX_SCOPE_TOKENS].join(":");
    let nine = ["t"; MAX_SCOPE_TOKENS + 1].join(":");
    let bad_scope = |s: &str| IdError::BadScope(s.to_owned());
    let cases: Vec<Case<&'static str>> = vec![
        ok(
            "three tokens",
            "stripe:read:customers",
            "stripe.read.customers",
        ),
        ok("one token", "stripe", "stripe"),
        ok(
            "token chars",
            "s3:put-object:bucket_1",
            "s3.put-object.bucket_1",
        ),
        ok("token chars", "-:_:0", "-._.0"),
        ok("8 tokens", eight.clone(), "t.t.t.t.t.t.t.t"),
        bad("8 tokens", nine.clone(), bad_scope(&nine)),
        ok("token <= 64 bytes", format!("x:{t64}"), ""),
        bad(
            "token <= 64 bytes",
            format!("x:{t65}"),
            bad_scope(&format!("x:{t65}")),
        ),
        bad("token <= 64 bytes", t65.clone(), bad_scope(&t65)),
        bad("non-empty", "", bad_scope("")),
        bad("no empty token", ":", bad_scope(":")),
        bad("no empty token", "a:", bad_scope("a:")),
        bad("no empty token", ":a", bad_scope(":a")),
        bad("no empty token", "a::b", bad_scope("a::b")),
        bad("lowercase", "Stripe:read", bad_scope("Stripe:read")),
        bad("lowercase", "stripe:READ", bad_scope("stripe:READ")),
        bad(
            "no '.' in the human form",
            "stripe.read",
            bad_scope("stripe.read"),
        ),
        bad("no '/'", "stripe/read", bad_scope("stripe/read")),
        bad(
            "no space",
            "stripe:read customers",
            bad_scope("stripe:read customers"),
        ),
        bad("no space", " stripe", bad_scope(" stripe")),
        bad("no '%'", "a%3Ab", bad_scope("a%3Ab")),
        bad("no '*'", "stripe:*", bad_scope("stripe:*")),
        bad("ASCII only", "café", bad_scope("café")),
    ];
    run_table("Scope::parse", cases, |input, want| {
        let got = Scope::parse(input);
        if got != input.parse::<Scope>() {
            return Err("parse and from_str disagree".into());
        }
        match (want, got) {
            (Err(want), Err(got)) if *want == got => Ok(()),
            (Ok(segment), Ok(s)) => {
                let want_segment = if segment.is_empty() {
                    input.replace(':', ".")
                } else {
                    (*segment).to_owned()
                };
                if s.as_str() != input || s.to_string() != input {
                    return Err(format!("human form became {s}"));
                }
                if s.to_segment() != want_segment {
                    return Err(format!(
                        "segment {:?}, want {want_segment:?}",
                        s.to_segment()
                    ));
                }
                match Scope::from_segment(&s.to_segment()) {
                    Ok(back) if back == s => Ok(()),
                    other => Err(format!("from_segment(to_segment) gave {other:?}")),
                }
            }
            (want, got) => Err(format!("got {got:?}, want {want:?}")),
        }
    });
}

#[test]
fn scope_from_segment_table() {
    let nine = ["t"; MAX_SCOPE_TOKENS + 1].join(".");
    let bad_scope = |s: &str| IdError::BadScope(s.to_owned());
    let cases: Vec<Case<&'static str>> = vec![
        ok(
            "segment form",
            "stripe.read.customers",
            "stripe:read:customers",
        ),
        ok("one token", "stripe", "stripe"),
        ok("8 tokens", "a.b.c.d.e.f.g.h", "a:b:c:d:e:f:g:h"),
        bad("8 tokens", nine.clone(), bad_scope(&nine)),
        bad(
            "no ':' in the segment form",
            "stripe:read",
            bad_scope("stripe:read"),
        ),
        bad("non-empty", "", bad_scope("")),
        bad("no empty token", ".a", bad_scope(".a")),
        bad("no empty token", "a.", bad_scope("a.")),
        bad("no empty token", "a..b", bad_scope("a..b")),
        bad("no empty token", "...", bad_scope("...")),
        bad("lowercase", "Stripe.read", bad_scope("Stripe.read")),
    ];
    run_table("Scope::from_segment", cases, |input, want| {
        match (want, Scope::from_segment(input)) {
            (Err(want), Err(got)) if *want == got => Ok(()),
            (Ok(human), Ok(s)) if s.as_str() == *human && s.to_segment() == input => Ok(()),
            (want, got) => Err(format!("got {got:?}, want {want:?}")),
        }
    });
}

#[test]
fn scope_segment_round_trip_and_sets() {
    for s in [
        "stripe:read:customers",
        "a",
        "a:b:c:d:e:f:g:h",
        "s3:put-object",
        "_:-",
    ] {
        let scope = scope(s);
        assert_eq!(Scope::from_segment(&scope.to_segment()).unwrap(), scope);
        assert_eq!(scope.to_segment().replace('.', ":"), s);
    }
    let set = scopes(&[
        "stripe:write:refunds",
        "stripe:read:customers",
        "stripe:write:refunds",
    ]);
    assert_eq!(set.len(), 2, "a scope set drops duplicates");
    assert_eq!(
        parse_scopes(&["stripe:read", "Bad"]),
        Err(IdError::BadScope("Bad".into()))
    );
}

// ---------------------------------------------------------------------------------------------
// 4. ScopedId
// ---------------------------------------------------------------------------------------------

const BOT: &str = "spiffe://acme.test/agents/billing-bot";
const BOT_SCOPED: &str =
    "spiffe://acme.test/agents/billing-bot/scope/stripe.read.customers/stripe.write.refunds";

#[test]
fn scoped_id_encodes_sorted_design_example() {
    let wanted = scopes(&["stripe:write:refunds", "stripe:read:customers"]);
    let scoped = ScopedId::new(id(BOT), wanted.clone()).unwrap();
    assert_eq!(scoped.spiffe_id().as_str(), BOT_SCOPED);
    assert_eq!(scoped.to_string(), BOT_SCOPED);
    assert_eq!(scoped.base(), &id(BOT));
    assert_eq!(scoped.scopes(), &wanted);
    // The encoding is itself a valid SPIFFE ID, for Mayfly and for other SPIFFE tools.
    assert_eq!(id(BOT_SCOPED), *scoped.spiffe_id());
    assert_eq!(
        spiffe::SpiffeId::new(BOT_SCOPED).unwrap().to_string(),
        BOT_SCOPED
    );
}

#[test]
fn scoped_id_decodes_design_example() {
    let decoded = ScopedId::from_spiffe_id(&id(BOT_SCOPED)).unwrap();
    assert_eq!(decoded.base(), &id(BOT));
    assert_eq!(
        decoded.scopes(),
        &scopes(&["stripe:read:customers", "stripe:write:refunds"])
    );
    assert_eq!(decoded.spiffe_id(), &id(BOT_SCOPED));
    let encoded = ScopedId::new(id(BOT), decoded.scopes().clone()).unwrap();
    assert_eq!(decoded, encoded);
}

#[test]
fn scoped_id_without_scopes() {
    // No `/scope/`: no scopes, the base is the whole ID.
    for s in [BOT, "spiffe://acme.test", "spiffe://acme.test/a/b/c"] {
        let decoded = ScopedId::from_spiffe_id(&id(s)).unwrap();
        assert_eq!(decoded.base(), &id(s));
        assert!(decoded.scopes().is_empty());
        assert_eq!(decoded.spiffe_id(), &id(s));
    }
    // And no scopes encode as the base alone.
    let plain = ScopedId::new(id(BOT), ScopeSet::new()).unwrap();
    assert_eq!(plain.spiffe_id(), &id(BOT));
    assert_eq!(plain, ScopedId::from_spiffe_id(&id(BOT)).unwrap());
}

#[test]
fn scoped_id_decode_table() {
    use IdError::*;
    type Decoded = (&'static str, &'static [&'static str]);
    let cases: Vec<Case<Decoded>> = vec![
        ok(
            "mark with scopes",
            BOT_SCOPED,
            (BOT, &["stripe:read:customers", "stripe:write:refunds"]),
        ),
        ok(
            "one scope",
            "spiffe://acme.test/a/scope/x",
            ("spiffe://acme.test/a", &["x"]),
        ),
        ok(
            "root base",
            "spiffe://acme.test/scope/x",
            ("spiffe://acme.test", &["x"]),
        ),
        ok(
            "a scope named 'scope'",
            "spiffe://acme.test/a/scope/scope",
            ("spiffe://acme.test/a", &["scope"]),
        ),
        ok(
            "first mark splits",
            "spiffe://acme.test/a/scope/b/scope",
            ("spiffe://acme.test/a", &["b", "scope"]),
        ),
        bad(
            "mark needs scopes",
            "spiffe://acme.test/agents/bot/scope",
            EmptyScopeList("spiffe://acme.test/agents/bot/scope".into()),
        ),
        bad(
            "mark needs scopes",
            "spiffe://acme.test/scope",
            EmptyScopeList("spiffe://acme.test/scope".into()),
        ),
        bad(
            "sorted",
            "spiffe://acme.test/a/scope/stripe.write.refunds/stripe.read.customers",
            UnsortedScopes(
                "spiffe://acme.test/a/scope/stripe.write.refunds/stripe.read.customers".into(),
            ),
        ),
        bad(
            "unique",
            "spiffe://acme.test/a/scope/x/x",
            UnsortedScopes("spiffe://acme.test/a/scope/x/x".into()),
        ),
        bad(
            "unique",
            "spiffe://acme.test/a/scope/x/y/y",
            UnsortedScopes("spiffe://acme.test/a/scope/x/y/y".into()),
        ),
        bad(
            "scope grammar",
            "spiffe://acme.test/a/scope/Stripe.read",
            BadScope("Stripe.read".into()),
        ),
        bad(
            "scope grammar",
            "spiffe://acme.test/a/scope/a..b",
            BadScope("a..b".into()),
        ),
        bad(
            "scope grammar",
            "spiffe://acme.test/a/scope/.a",
            BadScope(".a".into()),
        ),
        bad(
            "scope grammar",
            "spiffe://acme.test/a/scope/x/a.b.c.d.e.f.g.h.i",
            BadScope("a.b.c.d.e.f.g.h.i".into()),
        ),
        // Only the whole segment `scope` is the mark.
        ok(
            "not a mark",
            "spiffe://acme.test/agents/scopes/x",
            ("spiffe://acme.test/agents/scopes/x", &[]),
        ),
        ok(
            "not a mark",
            "spiffe://acme.test/agents/scopex",
            ("spiffe://acme.test/agents/scopex", &[]),
        ),
        ok(
            "not a mark",
            "spiffe://acme.test/agents/myscope/x",
            ("spiffe://acme.test/agents/myscope/x", &[]),
        ),
        ok(
            "not a mark",
            "spiffe://acme.test/scope-x/y",
            ("spiffe://acme.test/scope-x/y", &[]),
        ),
        ok(
            "not a mark",
            "spiffe://acme.test/scope.x/y",
            ("spiffe://acme.test/scope.x/y", &[]),
        ),
        ok(
            "not a mark (case matters)",
            "spiffe://acme.test/Scope/x",
            ("spiffe://acme.test/Scope/x", &[]),
        ),
        ok(
            "not a mark, then a mark",
            "spiffe://acme.test/scopes/scope/x",
            ("spiffe://acme.test/scopes", &["x"]),
        ),
        // The mark lives in the path: a trust domain that reads "scope" is not one.
        ok(
            "not in the trust domain",
            "spiffe://scope/x",
            ("spiffe://scope/x", &[]),
        ),
    ];
    run_table("ScopedId::from_spiffe_id", cases, |input, want| {
        let parsed = SpiffeId::parse(input).map_err(|e| format!("not a SPIFFE ID: {e}"))?;
        match (want, ScopedId::from_spiffe_id(&parsed)) {
            (Err(want), Err(got)) if *want == got => Ok(()),
            (Ok((base, list)), Ok(got)) => {
                if got.base().as_str() != *base {
                    return Err(format!("base {}, want {base}", got.base()));
                }
                if got.scopes() != &scopes(list) {
                    return Err(format!("scopes {:?}, want {list:?}", got.scopes()));
                }
                if got.spiffe_id() != &parsed {
                    return Err(format!("spiffe_id {}", got.spiffe_id()));
                }
                // Decoding accepts only the canonical encoding.
                match ScopedId::new(got.base().clone(), got.scopes().clone()) {
                    Ok(again) if again == got => Ok(()),
                    other => Err(format!("re-encoding gave {other:?}")),
                }
            }
            (want, got) => Err(format!("got {got:?}, want {want:?}")),
        }
    });
}

/// DESIGN.md: "one segment per scope, sorted". The segments in the URI (what is signed, and
/// what any other tool reading the SAN sees) are in ascending byte order. The human form sorts
/// differently when a ':' meets a digit (':' > '0'..'9' but '.' < '0'..'9').
#[test]
fn scoped_id_segments_are_sorted_as_written_in_the_uri() {
    let scoped = ScopedId::new(id(BOT), scopes(&["db:read", "db2:read"])).unwrap();
    assert_eq!(
        scoped.spiffe_id().as_str(),
        "spiffe://acme.test/agents/billing-bot/scope/db.read/db2.read"
    );
    let decoded = ScopedId::from_spiffe_id(scoped.spiffe_id()).unwrap();
    assert_eq!(decoded, scoped);

    let reversed = id("spiffe://acme.test/agents/billing-bot/scope/db2.read/db.read");
    assert_eq!(
        ScopedId::from_spiffe_id(&reversed),
        Err(IdError::UnsortedScopes(reversed.to_string()))
    );

    let scoped = ScopedId::new(id(BOT), scopes(&["v1:x", "v10", "v1"])).unwrap();
    assert_eq!(
        scoped.spiffe_id().as_str(),
        "spiffe://acme.test/agents/billing-bot/scope/v1/v1.x/v10"
    );
}

#[test]
fn scoped_id_refuses_reserved_base() {
    for base in [
        "spiffe://acme.test/agents/scope/x",
        "spiffe://acme.test/scope",
        "spiffe://acme.test/a/scope",
    ] {
        let want = Err(IdError::ReservedScopeSegment(base.into()));
        assert_eq!(ScopedId::new(id(base), scopes(&["x"])), want, "{base}");
        assert_eq!(ScopedId::new(id(base), ScopeSet::new()), want, "{base}");
    }
    // Segments that merely contain "scope" are fine.
    assert!(ScopedId::new(id("spiffe://acme.test/scopes/myscope"), scopes(&["x"])).is_ok());
}

#[test]
fn scoped_id_length_limit() {
    let token = "t".repeat(60);
    let set = scopes(&[token.as_str()]);
    let added = "/scope/".len() + token.len(); // 67
    // Exactly 2048 bytes once encoded: accepted.
    let base = id(&id_of_len(MAX_SPIFFE_ID_LEN - added));
    let scoped = ScopedId::new(base, set.clone()).unwrap();
    assert_eq!(scoped.spiffe_id().as_str().len(), MAX_SPIFFE_ID_LEN);
    assert_eq!(
        ScopedId::from_spiffe_id(scoped.spiffe_id()).unwrap(),
        scoped
    );
    // One byte more: refused with the encoded length.
    let base = id(&id_of_len(MAX_SPIFFE_ID_LEN - added + 1));
    assert_eq!(
        ScopedId::new(base, set.clone()),
        Err(IdError::TooLong(MAX_SPIFFE_ID_LEN + 1))
    );
    // A valid, short base with many long scopes.
    let many: Vec<String> = (0..40)
        .map(|i| format!("{i:02}:{}", "s".repeat(60)))
        .collect();
    let many = parse_scopes(&many).unwrap();
    let want_len =
        BOT.len() + "/scope".len() + many.iter().map(|s| 1 + s.as_str().len()).sum::<usize>();
    assert_eq!(
        ScopedId::new(id(BOT), many),
        Err(IdError::TooLong(want_len))
    );
}

#[test]
fn scoped_id_grants_exactly() {
    let scoped = ScopedId::new(
        id(BOT),
        scopes(&["stripe:read", "stripe:write:refunds", "read"]),
    )
    .unwrap();
    for yes in ["stripe:read", "stripe:write:refunds", "read"] {
        assert!(scoped.grants(&scope(yes)), "{yes} must be granted");
    }
    for no in [
        "read-admin",
        "reader",
        "rea",
        "stripe:read-admin",
        "stripe:read:customers",
        "stripe",
        "stripe:write",
        "stripe:write:refunds:all",
        "stripe:write:refunds-all",
        "write:refunds",
    ] {
        assert!(!scoped.grants(&scope(no)), "{no} must not be granted");
    }
    // Case matters: an uppercase scope is not a scope at all, so it can never match.
    assert!(Scope::parse("Stripe:read").is_err());
    assert!(Scope::parse("STRIPE:READ").is_err());
    // Nothing is granted without scopes.
    let bare = ScopedId::new(id(BOT), ScopeSet::new()).unwrap();
    assert!(!bare.grants(&scope("stripe:read")));
}

// ---------------------------------------------------------------------------------------------
// 5. check_registrable
// ---------------------------------------------------------------------------------------------

#[test]
fn check_registrable_table() {
    use IdError::*;
    let foreign = |id: &str| ForeignTrustDomain {
        id: id.into(),
        expected: "acme.test".into(),
    };
    let cases: Vec<Case<()>> = vec![
        ok("registrable", BOT, ()),
        ok("registrable", "spiffe://acme.test/a", ()),
        ok(
            "whole segment 'scope' only",
            "spiffe://acme.test/agents/scopes/x",
            (),
        ),
        ok("whole segment 'scope' only", "spiffe://acme.test/Scope", ()),
        ok(
            "whole segment 'mayfly' only",
            "spiffe://acme.test/mayfly-agent/x",
            (),
        ),
        ok(
            "only a leading 'mayfly'",
            "spiffe://acme.test/agents/mayfly",
            (),
        ),
        bad(
            "no 'scope' segment",
            "spiffe://acme.test/agents/scope/x",
            ReservedScopeSegment("spiffe://acme.test/agents/scope/x".into()),
        ),
        bad(
            "no 'scope' segment",
            "spiffe://acme.test/agents/bot/scope",
            ReservedScopeSegment("spiffe://acme.test/agents/bot/scope".into()),
        ),
        bad(
            "no 'scope' segment",
            "spiffe://acme.test/scope",
            ReservedScopeSegment("spiffe://acme.test/scope".into()),
        ),
        bad(
            "no /mayfly/ prefix",
            "spiffe://acme.test/mayfly/agent/x",
            ReservedPrefix("spiffe://acme.test/mayfly/agent/x".into()),
        ),
        bad(
            "no /mayfly/ prefix",
            "spiffe://acme.test/mayfly",
            ReservedPrefix("spiffe://acme.test/mayfly".into()),
        ),
        bad(
            "not the root",
            "spiffe://acme.test",
            RootId("spiffe://acme.test".into()),
        ),
        bad(
            "same trust domain",
            "spiffe://other.test/agents/x",
            foreign("spiffe://other.test/agents/x"),
        ),
        bad(
            "same trust domain",
            "spiffe://acme.test.evil/agents/x",
            foreign("spiffe://acme.test.evil/agents/x"),
        ),
        bad(
            "same trust domain",
            "spiffe://acme.tes/agents/x",
            foreign("spiffe://acme.tes/agents/x"),
        ),
        bad(
            "same trust domain",
            "spiffe://other.test",
            foreign("spiffe://other.test"),
        ),
    ];
    let acme = td("acme.test");
    run_table("check_registrable", cases, |input, want| {
        let got = id(input).check_registrable(&acme);
        if &got == want {
            Ok(())
        } else {
            Err(format!("got {got:?}, want {want:?}"))
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 6. is_under
// ---------------------------------------------------------------------------------------------

#[test]
fn is_under_whole_segments() {
    let cases = [
        ("spiffe://acme.test/a/b", "spiffe://acme.test/a", true),
        ("spiffe://acme.test/a/b/c", "spiffe://acme.test/a", true),
        ("spiffe://acme.test/a", "spiffe://acme.test/a", true),
        ("spiffe://acme.test/a", "spiffe://acme.test", true),
        ("spiffe://acme.test", "spiffe://acme.test", true),
        ("spiffe://acme.test/ab", "spiffe://acme.test/a", false),
        ("spiffe://acme.test/a.b", "spiffe://acme.test/a", false),
        ("spiffe://acme.test/a-b/c", "spiffe://acme.test/a", false),
        ("spiffe://acme.test/A/b", "spiffe://acme.test/a", false),
        ("spiffe://acme.test/a", "spiffe://acme.test/a/b", false),
        ("spiffe://acme.test", "spiffe://acme.test/a", false),
        ("spiffe://acme.test.evil/a", "spiffe://acme.test", false),
        ("spiffe://acme.testx/a", "spiffe://acme.test", false),
        ("spiffe://other.test/a/b", "spiffe://acme.test/a", false),
    ];
    for (child, parent, want) in cases {
        assert_eq!(
            id(child).is_under(&id(parent)),
            want,
            "{child} under {parent}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Properties
// ---------------------------------------------------------------------------------------------

fn trust_domain_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9._-]{1,24}",
        1 => "[a-z0-9._-]{240,255}",
    ]
}

fn path_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-zA-Z0-9._-]{1,16}",
        2 => "[.a]{1,4}",
        1 => Just("scope".to_owned()),
        1 => Just("mayfly".to_owned()),
    ]
    .prop_filter("'.' and '..' are not SPIFFE segments", |s| {
        s != "." && s != ".."
    })
}

fn base_segment() -> impl Strategy<Value = String> {
    path_segment().prop_filter("a base never has the scope mark", |s| s != "scope")
}

fn scope_token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_-]{1,12}",
        // A small alphabet makes shared prefixes, and ':'-versus-digit orderings, common.
        2 => "[ab019_-]{1,2}",
    ]
}

fn any_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        prop::collection::vec(scope_token(), 1..=3),
        prop::collection::vec(scope_token(), 1..=MAX_SCOPE_TOKENS),
    ]
    .prop_map(|tokens| Scope::parse(&tokens.join(":")).expect("generated scope is valid"))
}

fn format_id(name: &str, segments: &[String]) -> String {
    let mut s = format!("spiffe://{name}");
    for segment in segments {
        s.push('/');
        s.push_str(segment);
    }
    s
}

/// Strings that often look like SPIFFE IDs, so both the accept and the refuse paths are hit.
fn id_like_string() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<String>(),
        2 => "(spiffe|SPIFFE|http)?(://)?[a-zA-Z0-9._:@%?#/-]{0,40}",
        3 => "spiffe://[a-z.]{0,6}(/(scope|scopes|mayfly|[a-zA-Z0-9._:-]{0,5})){0,8}",
        2 => "spiffe://acme\\.test(/(scope|[ab01.-]{1,4})){0,8}",
        1 => "spiffe://[a-z]{1,3}(/\\PC{0,3}){0,4}",
    ]
}

proptest! {
    // No regression file: this suite owns tests/id_rules.rs only; a failure prints its
    // minimal input, which belongs in a table above.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// parse(format(x)) == x, and formatting the parsed ID gives back the input unchanged.
    #[test]
    fn valid_ids_round_trip(
        name in trust_domain_name(),
        segments in prop::collection::vec(path_segment(), 0..10),
    ) {
        let text = format_id(&name, &segments);
        let parsed = SpiffeId::parse(&text);
        prop_assert!(parsed.is_ok(), "{text:?} refused: {parsed:?}");
        let parsed = parsed.unwrap();
        prop_assert_eq!(parsed.to_string(), text.clone());
        prop_assert_eq!(parsed.as_str(), text.as_str());
        prop_assert_eq!(parsed.trust_domain_name(), name.as_str());
        prop_assert_eq!(parsed.segments().collect::<Vec<_>>(), segments.iter().map(String::as_str).collect::<Vec<_>>());
        prop_assert_eq!(parsed.is_root(), segments.is_empty());
        prop_assert_eq!(&SpiffeId::parse(&parsed.to_string()).unwrap(), &parsed);
        prop_assert_eq!(&text.parse::<SpiffeId>().unwrap(), &parsed);
        // Built from its parts, it is the same ID.
        let domain = TrustDomain::new(&name).unwrap();
        prop_assert_eq!(&domain.join(parsed.path()).unwrap(), &parsed);
        prop_assert!(parsed.is_under(&domain.id()));
        // And any SPIFFE implementation reads it the same way.
        let theirs = spiffe::SpiffeId::new(&text);
        prop_assert!(theirs.is_ok(), "spiffe crate refused {text:?}: {theirs:?}");
        prop_assert_eq!(theirs.unwrap().to_string(), text);
    }

    /// A base and a scope set survive encoding into one SPIFFE ID and decoding back.
    #[test]
    fn scoped_ids_round_trip(
        name in "[a-z0-9._-]{1,24}",
        segments in prop::collection::vec(base_segment(), 0..10),
        set in prop::collection::btree_set(any_scope(), 0..8),
    ) {
        let base = SpiffeId::parse(&format_id(&name, &segments)).unwrap();
        let scoped = ScopedId::new(base.clone(), set.clone());
        prop_assert!(scoped.is_ok(), "{base} + {set:?}: {scoped:?}");
        let scoped = scoped.unwrap();
        let encoded = scoped.spiffe_id();
        // Still a valid SPIFFE ID, byte for byte.
        prop_assert_eq!(&SpiffeId::parse(encoded.as_str()).unwrap(), encoded);
        prop_assert!(encoded.is_under(&base));
        let decoded = ScopedId::from_spiffe_id(encoded);
        prop_assert!(decoded.is_ok(), "{encoded} does not decode: {decoded:?}");
        let decoded = decoded.unwrap();
        prop_assert_eq!(decoded.base(), &base);
        prop_assert_eq!(decoded.scopes(), &set);
        prop_assert_eq!(&decoded, &scoped);
        for s in &set {
            prop_assert!(decoded.grants(s));
        }
        // The scope segments, as written in the URI, are strictly ascending.
        let tail: Vec<&str> = encoded.as_str()[base.as_str().len()..]
            .split('/')
            .skip(2) // "" and "scope"
            .collect();
        let mut sorted = tail.clone();
        sorted.sort_unstable();
        sorted.dedup();
        prop_assert_eq!(&tail, &sorted, "segments of {} are not sorted", encoded);
        prop_assert_eq!(tail.len(), set.len());
    }

    /// Scope: human form -> segment form -> human form is the identity.
    #[test]
    fn scope_forms_round_trip(s in any_scope()) {
        let segment = s.to_segment();
        prop_assert_eq!(&Scope::from_segment(&segment).unwrap(), &s);
        prop_assert_eq!(&Scope::parse(s.as_str()).unwrap(), &s);
        prop_assert!(!segment.contains(':'));
        prop_assert_eq!(segment.replace('.', ":"), s.as_str());
    }

    /// Arbitrary input never panics, and whatever is accepted is kept exactly as written.
    #[test]
    fn parse_never_panics_and_keeps_what_it_accepts(input in id_like_string()) {
        if let Ok(parsed) = SpiffeId::parse(&input) {
            prop_assert_eq!(parsed.to_string(), input.clone());
            prop_assert!(input.len() <= MAX_SPIFFE_ID_LEN);
            prop_assert!(input.is_ascii());
            let theirs = spiffe::SpiffeId::new(&input);
            prop_assert!(theirs.is_ok(), "spiffe crate refused {input:?}: {theirs:?}");
            prop_assert_eq!(theirs.unwrap().to_string(), input.clone());
            prop_assert!(parsed.is_under(&parsed.trust_domain().id()));
            // Decoding scopes never panics either; when it succeeds, the encoding is canonical.
            if let Ok(scoped) = ScopedId::from_spiffe_id(&parsed) {
                prop_assert!(!scoped.base().segments().any(|s| s == "scope"));
                prop_assert!(parsed.is_under(scoped.base()));
                let again = ScopedId::new(scoped.base().clone(), scoped.scopes().clone());
                prop_assert_eq!(again.as_ref().map(|s| s.spiffe_id()), Ok(&parsed));
            }
        }
        if let Ok(domain) = input.parse::<TrustDomain>() {
            prop_assert!(TrustDomain::new(domain.as_str()).is_ok());
            prop_assert_eq!(SpiffeId::parse(domain.id().as_str()).unwrap(), domain.id());
        }
        if let Ok(s) = Scope::parse(&input) {
            prop_assert_eq!(s.as_str(), input.as_str());
            prop_assert_eq!(&Scope::from_segment(&s.to_segment()).unwrap(), &s);
        }
        if let Ok(s) = Scope::from_segment(&input) {
            prop_assert_eq!(s.to_segment(), input.clone());
        }
    }

    /// `join` never leaves its trust domain, whatever the path.
    #[test]
    fn join_stays_in_its_trust_domain(path in "[a-z0-9./:?#@%_-]{0,12}") {
        let acme = td("acme.test");
        if let Ok(joined) = acme.join(&path) {
            prop_assert_eq!(joined.trust_domain(), acme.clone());
            prop_assert_eq!(joined.path(), path.as_str());
            prop_assert!(joined.is_under(&acme.id()));
        }
    }
}

/// Scopes are a set: the same scopes in any order encode to the same ID.
#[test]
fn scoped_id_is_independent_of_insertion_order() {
    let a: BTreeSet<Scope> = ["b:x", "a:y", "a"].iter().map(|s| scope(s)).collect();
    let b: BTreeSet<Scope> = ["a", "b:x", "a:y"].iter().map(|s| scope(s)).collect();
    assert_eq!(
        ScopedId::new(id(BOT), a).unwrap().spiffe_id(),
        ScopedId::new(id(BOT), b).unwrap().spiffe_id()
    );
}
