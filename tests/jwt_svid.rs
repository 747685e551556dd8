//! JWT-SVIDs through the real `mayfly` binary (issue 11): a server, an agent and this process
//! as the workload. Task JWTs carry the scoped ID and a `scope` claim, are validated by the
//! agent and audited with their audience and `jti`; identity JWTs are cached by the agent until
//! half their life; bad input is refused in one sentence and nothing is issued.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::cluster::Cluster;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A cluster whose agent serves this process (uid) an entry with `db:read` and `db:write`.
fn serving_cluster() -> Cluster {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    cluster.create_entry_for_this_process(
        "spiffe://mayfly.local/agents/reader",
        &["--scope", "db:read", "--scope", "db:write"],
    );
    cluster.ok_eventually(&["svid", "fetch", "--jwt", "--audience", "warm-up"]);
    cluster
}

fn mint(cluster: &Cluster, extra: &[&str]) -> Output {
    let mut args = vec!["svid", "mint", "--jwt", "--task", "t-1"];
    args.extend_from_slice(extra);
    cluster.mayfly(&args)
}

fn records(cluster: &Cluster, action: &str) -> Vec<serde_json::Value> {
    cluster
        .ok(&["audit", "list", "--output", "json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == action)
        .collect()
}

#[test]
fn a_task_jwt_carries_its_scopes_validates_for_its_audience_only_and_is_audited() {
    let cluster = serving_cluster();
    let out = mint(
        &cluster,
        &[
            "--audience",
            "stripe-api",
            "--scope",
            "db:read",
            "--ttl",
            "2m",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out);
    assert_eq!(token.lines().count(), 1, "one line: {token:?}");
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "{token}");

    let valid = cluster.ok(&[
        "svid",
        "validate",
        "--jwt",
        token,
        "--audience",
        "stripe-api",
        "--output",
        "json",
    ]);
    let valid: serde_json::Value = serde_json::from_str(&valid).unwrap();
    let scoped = "spiffe://mayfly.local/agents/reader/scope/db.read";
    assert_eq!(valid["spiffe_id"], scoped);
    assert_eq!(valid["claims"]["sub"], scoped);
    assert_eq!(valid["claims"]["scope"], "db:read");
    assert_eq!(valid["claims"]["aud"], serde_json::json!(["stripe-api"]));
    let (iat, exp) = (
        valid["claims"]["iat"].as_i64().unwrap(),
        valid["claims"]["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 120, "the TTL asked for");
    let jti = valid["claims"]["jti"].as_str().unwrap().to_owned();

    // The same token for another audience is refused, in one sentence, with a non-zero exit.
    let wrong = cluster.mayfly(&[
        "svid",
        "validate",
        "--jwt",
        token,
        "--audience",
        "github-api",
    ]);
    assert!(!wrong.status.success());
    let err = stderr(&wrong);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("audience"), "{err}");
    // A token with one character of its payload changed does not verify.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let flipped = if parts[1].ends_with('A') { 'B' } else { 'A' };
    parts[1].pop();
    parts[1].push(flipped);
    let forged = parts.join(".");
    let bad = cluster.mayfly(&[
        "svid",
        "validate",
        "--jwt",
        &forged,
        "--audience",
        "stripe-api",
    ]);
    assert!(!bad.status.success(), "a forged token validated");

    // Audited: the task, the scoped ID, the audience, the jti as the serial.
    let audited = records(&cluster, "jwt.task");
    let record = audited
        .iter()
        .find(|r| r["decision"] == "allow")
        .expect("the mint is audited");
    assert_eq!(record["task_id"], "t-1");
    assert_eq!(record["spiffe_id"], scoped);
    assert_eq!(record["serial"], jti.as_str());
    assert!(
        record["reason"].as_str().unwrap().contains("stripe-api"),
        "{record}"
    );
}

#[test]
fn an_identity_jwt_is_reused_until_half_its_life_and_each_audience_has_its_own() {
    let cluster = serving_cluster();
    let fetch = |aud: &str| cluster.ok(&["svid", "fetch", "--jwt", "--audience", aud]);
    let first = fetch("billing");
    assert_eq!(first, fetch("billing"), "the cached token is served again");
    let other = fetch("search");
    assert_ne!(first, other, "another audience gets another token");
    let valid = cluster.ok(&[
        "svid",
        "validate",
        "--jwt",
        first.trim(),
        "--audience",
        "billing",
        "--output",
        "json",
    ]);
    assert!(
        valid.contains("\"spiffe://mayfly.local/agents/reader\""),
        "{valid}"
    );
    assert!(
        !valid.contains("\"scope\""),
        "an identity token has no scope claim: {valid}"
    );
    // The server signed once per audience (plus the warm-up): the cache spared the rest.
    let issued = records(&cluster, "jwt.identity")
        .into_iter()
        .filter(|r| r["decision"] == "allow")
        .count();
    assert_eq!(issued, 3, "warm-up, billing, search");
}

#[test]
fn bad_jwt_requests_are_refused_in_one_sentence_and_nothing_is_issued() {
    let cluster = serving_cluster();
    // Positive control on the same cluster.
    assert!(
        mint(&cluster, &["--audience", "api", "--scope", "db:read"])
            .status
            .success()
    );
    let before = records(&cluster, "jwt.task")
        .iter()
        .filter(|r| r["decision"] == "allow")
        .count();

    let long = "a".repeat(10 * 1024);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--audience", &long, "--scope", "db:read"], "audience"),
        (
            vec!["--audience", "two words", "--scope", "db:read"],
            "audience",
        ),
        (vec!["--audience", "api", "--scope", "db:admin"], "db:admin"),
        (
            vec!["--audience", "api", "--scope", "db:read", "--ttl", "2h"],
            "ceiling",
        ),
    ];
    for (args, needle) in cases {
        let out = mint(&cluster, &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} was minted");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Without an audience, the command line itself refuses.
    let out = cluster.mayfly(&["svid", "mint", "--jwt", "--task", "t", "--scope", "db:read"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--audience"), "{}", stderr(&out));

    let after = records(&cluster, "jwt.task")
        .iter()
        .filter(|r| r["decision"] == "allow")
        .count();
    assert_eq!(before, after, "nothing more was issued");

    // Malformed tokens: each refused with its reason, the agent keeps serving.
    let huge = "a".repeat(64 * 1024);
    for (token, needle) in [
        ("abc", "compact JWS"),
        ("a.b", "2 parts"),
        ("a.b.c.d", "more than 3 parts"),
        ("!!.!!.!!", "base64url"),
        (huge.as_str(), "limit"),
    ] {
        let out = cluster.mayfly(&["svid", "validate", "--jwt", token, "--audience", "api"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(needle), "{needle}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert!(
        mint(&cluster, &["--audience", "api", "--scope", "db:read"])
            .status
            .success()
    );
}

/// The `kid` in a token's header.
fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// The `kid`s of `bundle show --format jwks`.
fn published_kids(cluster: &Cluster) -> Vec<String> {
    let jwks: serde_json::Value =
        serde_json::from_str(&cluster.ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(k["use"], "jwt-svid", "{k}");
            assert_eq!(k["alg"], "ES256", "{k}");
            k["kid"].as_str().unwrap().to_owned()
        })
        .collect();
    kids.sort();
    kids
}

#[test]
fn jwt_keys_rotate_with_the_ca_published_before_signing_and_kept_for_old_tokens() {
    let cluster = serving_cluster();
    let mint_token = |task: &str| {
        let out = cluster.mayfly(&[
            "svid",
            "mint",
            "--jwt",
            "--audience",
            "api",
            "--task",
            task,
            "--scope",
            "db:read",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    let validates = |token: &str| {
        cluster
            .mayfly(&["svid", "validate", "--jwt", token, "--audience", "api"])
            .status
            .success()
    };
    let old = mint_token("before");
    let old_kid = kid_of(&old);
    assert_eq!(published_kids(&cluster), vec![old_kid.clone()]);
    // The SPIFFE bundle carries the JWT key beside the X.509 authorities.
    let spiffe = cluster.ok(&["bundle", "show", "--format", "spiffe"]);
    assert!(
        spiffe.contains("\"jwt-svid\"") && spiffe.contains("\"x509-svid\""),
        "{spiffe}"
    );

    cluster.ok(&["ca", "prepare"]);
    let kids = published_kids(&cluster);
    assert_eq!(
        kids.len(),
        2,
        "the prepared CA's key is published at once: {kids:?}"
    );
    let new_kid = kids.iter().find(|k| **k != old_kid).unwrap().clone();
    assert_eq!(
        kid_of(&mint_token("prepared")),
        old_kid,
        "a prepared key signs nothing"
    );

    cluster.ok(&["ca", "activate"]);
    let new = mint_token("after");
    assert_eq!(kid_of(&new), new_kid, "the activated CA's key signs");
    // The agent learns keys with the bundle, before they sign: the new token validates at once
    // (a short wait covers the sync round that brought the prepared key).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !validates(&new) {
        assert!(
            Instant::now() < deadline,
            "the new key never reached the agent"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        validates(&old),
        "a token of the replaced key stays valid while it lives"
    );
    assert_eq!(
        published_kids(&cluster).len(),
        2,
        "the old key stays published"
    );
}

/// FetchJWTBundles is a stream: its first message holds the trust domain's JWKS, and a CA
/// prepared later pushes a message with the new key (no polling by the workload).
#[test]
fn the_jwt_bundle_stream_pushes_a_prepared_key() {
    let cluster = serving_cluster();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = mayfly::workload_client::connect(&cluster.socket())
            .await
            .unwrap();
        let mut stream = mayfly::workload_client::workload_api(channel)
            .fetch_jwt_bundles(mayfly::proto::workload::JwtBundlesRequest {})
            .await
            .unwrap()
            .into_inner();
        let keys = |m: &mayfly::proto::workload::JwtBundlesResponse| {
            let jwks = &m.bundles["spiffe://mayfly.local"];
            let td = mayfly::id::TrustDomain::new("mayfly.local").unwrap();
            mayfly::jwt::JwtBundle::from_jwks_json(td, jwks)
                .unwrap()
                .keys()
                .count()
        };
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(keys(&first), 1, "{first:?}");

        cluster.ok(&["ca", "prepare"]);
        let next = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("no message within 30 s of the CA's preparation")
            .unwrap()
            .unwrap();
        assert_eq!(keys(&next), 2, "{next:?}");
    });
}

/// A CA journaled before JWT-SVIDs existed (no JWT key in its row, no key file) gets a JWT key
/// at the server's next start, published at once, and the trust domain mints JWTs without a
/// CA rotation; a second restart keeps that key (it is not replaced by another).
#[test]
fn a_ca_from_before_jwt_svids_gets_its_key_at_the_next_start_and_keeps_it() {
    let mut cluster = Cluster::start();
    let before = published_kids(&cluster);
    assert_eq!(before.len(), 1, "positive control: a new CA has its key");
    cluster.stop_server();

    // Make the store look as an earlier version left it.
    let data = cluster.path(".mayfly/server");
    for file in std::fs::read_dir(data.join("ca")).unwrap() {
        let path = file.unwrap().path();
        if path.to_string_lossy().ends_with(".jwt.key") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let db = data.join("mayfly.sqlite");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let changed = sqlx::query("UPDATE ca_journal SET jwt_public = NULL")
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(changed, 1);
        pool.close().await;
    });

    cluster.start_server();
    let attached = published_kids(&cluster);
    assert_eq!(attached.len(), 1, "{attached:?}");
    assert_ne!(attached, before, "a new key, since the old one is gone");
    cluster.stop_server();
    cluster.start_server();
    assert_eq!(published_kids(&cluster), attached, "kept across restarts");

    // And it signs: an agent mints a task JWT that validates.
    cluster.start_agent();
    cluster.create_entry_for_this_process(
        "spiffe://mayfly.local/agents/reader",
        &["--scope", "db:read"],
    );
    let token = cluster.ok_eventually(&[
        "svid",
        "mint",
        "--jwt",
        "--task",
        "t-1",
        "--audience",
        "api",
        "--scope",
        "db:read",
    ]);
    let token = token.trim();
    assert_eq!(vec![kid_of(token)], attached);
}

/// The `spiffe` crate (rust-spiffe), unchanged: fetches the identity JWT-SVID and the JWT
/// bundles, verifies the token offline with its own verifier (jsonwebtoken on aws-lc-rs), has
/// the agent validate it, and is refused for another audience.
#[test]
fn the_spiffe_crate_fetches_verifies_and_validates_jwt_svids() {
    let cluster = serving_cluster();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(cluster.endpoint())
            .await
            .unwrap();
        let svid = client.fetch_jwt_svid(["ledger"], None).await.unwrap();
        assert_eq!(
            svid.spiffe_id().to_string(),
            "spiffe://mayfly.local/agents/reader"
        );
        let bundles = client.fetch_jwt_bundles().await.unwrap();
        let verified =
            spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["ledger"]).unwrap();
        assert_eq!(verified.spiffe_id(), svid.spiffe_id());
        assert!(
            spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["other"]).is_err(),
            "the crate's own check refuses another audience"
        );
        let validated = client
            .validate_jwt_token("ledger", svid.token())
            .await
            .unwrap();
        assert_eq!(validated.spiffe_id(), svid.spiffe_id());
        assert!(
            client
                .validate_jwt_token("other", svid.token())
                .await
                .is_err()
        );
    });
}

/// An entry's `--jwt-ttl` sets its identity tokens' lifetime and its `--hint` comes with them.
#[test]
fn an_entrys_jwt_ttl_and_hint_shape_its_identity_tokens() {
    let mut cluster = Cluster::start();
    cluster.start_agent();
    cluster.create_entry_for_this_process(
        "spiffe://mayfly.local/agents/brief",
        &["--jwt-ttl", "90s", "--hint", "billing"],
    );
    let token = cluster
        .ok_eventually(&["svid", "fetch", "--jwt", "--audience", "api"])
        .trim()
        .to_owned();
    let valid: serde_json::Value = serde_json::from_str(&cluster.ok(&[
        "svid",
        "validate",
        "--jwt",
        &token,
        "--audience",
        "api",
        "--output",
        "json",
    ]))
    .unwrap();
    let claims = &valid["claims"];
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        90
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = runtime.block_on(async {
        let channel = mayfly::workload_client::connect(&cluster.socket())
            .await
            .unwrap();
        mayfly::workload_client::workload_api(channel)
            .fetch_jwtsvid(mayfly::proto::workload::JwtsvidRequest {
                audience: vec!["api".into()],
                spiffe_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(answer.svids.len(), 1);
    assert_eq!(answer.svids[0].hint, "billing");
    assert_eq!(answer.svids[0].svid, token, "the cached token");
}
