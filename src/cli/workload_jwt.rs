//! JWT-SVID commands on the agent's socket (issue 11): `svid fetch --jwt`, `svid mint --jwt`
//! and `svid validate --jwt`. A token is printed alone on one line, so `$(mayfly svid mint
//! --jwt ...)` is the bearer credential.

use std::io::Read as _;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use mayfly::proto::task::MintJwtsvidRequest;
use mayfly::proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest};
use mayfly::text::escape;
use mayfly::workload_client as wc;
use serde::Serialize;

use super::output::Printer;

/// The longest token read from stdin for `svid validate --jwt -`.
const MAX_STDIN_TOKEN: u64 = 64 * 1024;

/// What `svid fetch|mint --jwt --output json` prints.
#[derive(Serialize)]
struct JwtView<'a> {
    spiffe_id: &'a str,
    token: &'a str,
    /// Unix seconds; absent for identity tokens, whose `exp` is inside the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<&'a str>,
}

/// `svid fetch --jwt --audience A`: the identity token of the first (or the named) identity.
pub async fn fetch(
    socket: &Path,
    audience: String,
    spiffe_id: Option<String>,
    out: Printer,
) -> Result<()> {
    let answer = wc::workload_api(wc::connect(socket).await?)
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![audience],
            spiffe_id: spiffe_id.unwrap_or_default(),
        })
        .await
        .map_err(wc::WorkloadClientError::Refused)?
        .into_inner();
    let svid = answer
        .svids
        .into_iter()
        .next()
        .ok_or(wc::WorkloadClientError::Empty)?;
    print_token(
        out,
        &JwtView {
            spiffe_id: &svid.spiffe_id,
            token: &svid.svid,
            expires_at: None,
            jti: None,
        },
    )
}

/// `svid mint --jwt`: a task token.
pub async fn mint(socket: &Path, request: MintJwtsvidRequest, out: Printer) -> Result<()> {
    let answer = wc::task_api(wc::connect(socket).await?)
        .mint_jwtsvid(request)
        .await
        .map_err(wc::WorkloadClientError::Refused)?
        .into_inner();
    print_token(
        out,
        &JwtView {
            spiffe_id: &answer.spiffe_id,
            token: &answer.token,
            expires_at: Some(answer.expires_at),
            jti: Some(&answer.jti),
        },
    )
}

fn print_token(out: Printer, view: &JwtView<'_>) -> Result<()> {
    if out.json_wanted() {
        return out.json(view);
    }
    // The token is base64url and dots only when it comes from a Mayfly agent; escaped anyway,
    // since it is printed to a terminal.
    out.line(escape(view.token))
}

/// What `svid validate --jwt --output json` prints.
#[derive(Serialize)]
struct ValidView<'a> {
    spiffe_id: &'a str,
    claims: serde_json::Value,
}

/// `svid validate --jwt TOKEN --audience A`: the agent's verdict, and the claims when valid.
pub async fn validate(socket: &Path, token: String, audience: String, out: Printer) -> Result<()> {
    let token = if token == "-" {
        let mut text = String::new();
        std::io::stdin()
            .take(MAX_STDIN_TOKEN)
            .read_to_string(&mut text)
            .map_err(|e| anyhow!("could not read the token from stdin: {e}"))?;
        text.trim().to_owned()
    } else {
        token
    };
    if token.is_empty() {
        bail!("--jwt is empty; pass the token, or - to read it from stdin");
    }
    let answer = wc::workload_api(wc::connect(socket).await?)
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience,
            svid: token,
        })
        .await
        .map_err(|status| anyhow!("{}", escape(status.message())))?
        .into_inner();
    let claims = answer.claims.map(from_struct).unwrap_or_default();
    if out.json_wanted() {
        return out.json(&ValidView {
            spiffe_id: &answer.spiffe_id,
            claims,
        });
    }
    out.line(format_args!("valid: {}", escape(&answer.spiffe_id)))?;
    let text = serde_json::to_string_pretty(&claims)?;
    out.line(escape(&text))
}

/// A `google.protobuf.Struct` back as JSON.
fn from_struct(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, from_value(v)))
            .collect(),
    )
}

fn from_value(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => {
            // Times and counts are whole numbers: print them as such.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                serde_json::Value::from(n as i64)
            } else {
                serde_json::Value::from(n)
            }
        }
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(from_value).collect(),
        Some(Kind::StructValue(s)) => from_struct(s),
    }
}
