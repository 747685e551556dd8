//! Operator commands on the server's admin socket: join tokens, agents, the bundle and the
//! audit log (entries have `cli::entry`). Each asks the admin API, then prints what came back:
//! JSON by the admin types' derived `Serialize`, text as aligned tables and escaped fields.

use std::time::SystemTime;

use anyhow::{Result, anyhow};
use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use mayfly::proto::admin as pb;
use mayfly::text::escape;
use serde::Serialize;
use tonic::transport::Channel;

use super::output::Printer;
use super::paged::PagedPrinter;
use super::table::Table;
use super::time::{when, when_ms};

/// A client of the admin API.
pub type Admin = pb::admin_client::AdminClient<Channel>;

/// `mayfly token`.
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a single-use join token and the SPIFFE ID its agent will get.
    Generate {
        /// How long the token stays usable, e.g. 10m or 1h30m.
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

/// `mayfly agent list|show|ban|evict`.
#[derive(Subcommand)]
pub enum AgentAdminCommand {
    /// List the attested agents.
    List,
    /// Show one agent: its record, its node selectors and the node groups it is in.
    Show {
        /// The agent's SPIFFE ID.
        id: String,
    },
    /// Ban an agent: refused at its next call, for good.
    Ban {
        /// The agent's SPIFFE ID.
        id: String,
    },
    /// Evict an agent: it must attest again with a new join token.
    Evict {
        /// The agent's SPIFFE ID.
        id: String,
    },
}

/// How `bundle show` prints the bundle.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// PEM certificates.
    Pem,
    /// A SPIFFE bundle (JWKS of the X.509 and JWT authorities).
    Spiffe,
    /// The JWT-SVID keys alone, as a JWKS (for verifiers outside SPIFFE).
    Jwks,
}

/// `mayfly bundle`.
#[derive(Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle.
    Show {
        /// PEM certificates, or a SPIFFE bundle (JWKS).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
}

/// `mayfly audit`.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// List audit records, oldest first.
    List {
        /// Only this task's records.
        #[arg(long)]
        task: Option<String>,
        /// Keep printing new records as they are written.
        #[arg(long)]
        follow: bool,
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many records (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Check the hash chain: detects edited, inserted and deleted records.
    Verify,
}

/// A gRPC status as the one sentence the server wrote.
pub fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow!("{}", status.message())
}

/// `token generate`.
pub async fn token(admin: &mut Admin, cmd: TokenCommand, out: Printer) -> Result<()> {
    let TokenCommand::Generate { ttl } = cmd;
    let ttl_seconds =
        mayfly::duration::parse_whole_seconds(&ttl).map_err(|e| anyhow!("--ttl: {e}"))?;
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds })
        .await
        .map_err(refused)?
        .into_inner();
    if out.json_wanted() {
        return out.json(&token);
    }
    out.line(format_args!("Token:    {}", escape(&token.token)))?;
    out.line(format_args!("Agent ID: {}", escape(&token.agent_id)))?;
    out.line(format_args!(
        "Expires:  {} (single use)",
        when(token.expires_at, SystemTime::now())
    ))
}

/// `agent list|show|ban|evict`.
pub async fn agent(admin: &mut Admin, cmd: AgentAdminCommand, out: Printer) -> Result<()> {
    match cmd {
        AgentAdminCommand::List => {
            let mut printer = PagedPrinter::new(out, "no agents", agent_table);
            let mut request = pb::ListAgentsRequest::default();
            loop {
                let page = admin
                    .list_agents(request.clone())
                    .await
                    .map_err(refused)?
                    .into_inner();
                printer.page(&page.agents)?;
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            printer.finish()
        }
        AgentAdminCommand::Show { id } => super::agent_show::show(admin, id, out).await,
        AgentAdminCommand::Ban { id } => {
            let agent = admin
                .ban_agent(pb::AgentIdRequest { spiffe_id: id })
                .await
                .map_err(refused)?
                .into_inner();
            if out.json_wanted() {
                out.json(&agent)
            } else {
                out.line(format_args!("banned {}", escape(&agent.spiffe_id)))
            }
        }
        AgentAdminCommand::Evict { id } => {
            admin
                .evict_agent(pb::AgentIdRequest {
                    spiffe_id: id.clone(),
                })
                .await
                .map_err(refused)?;
            #[derive(Serialize)]
            struct Evicted {
                evicted: String,
            }
            if out.json_wanted() {
                out.json(&Evicted { evicted: id })
            } else {
                out.line(format_args!(
                    "evicted {}; it must attest again",
                    escape(&id)
                ))
            }
        }
    }
}

/// `bundle show`.
pub async fn bundle(admin: &mut Admin, cmd: BundleCommand, out: Printer) -> Result<()> {
    let BundleCommand::Show { format } = cmd;
    let bundle = admin
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let jwt_keys = bundle
        .jwt_keys
        .iter()
        .map(|point| mayfly::jwt::JwtKey::from_point(point))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the server sent an unusable JWT key: {e}"))?;
    match format {
        BundleFormat::Pem => out.raw(&mayfly::bundle::to_pem(&bundle.certificates)),
        BundleFormat::Spiffe => {
            let info = mayfly::bundle::SpiffeBundleInfo {
                sequence: Some(bundle.sequence),
                refresh_hint_secs: u64::from(bundle.refresh_hint_seconds),
            };
            out.line(mayfly::bundle::to_spiffe_json_with_jwt(
                &bundle.certificates,
                &jwt_keys,
                info,
            )?)
        }
        BundleFormat::Jwks => {
            let td = mayfly::id::TrustDomain::new(&bundle.trust_domain)
                .map_err(|e| anyhow!("the server named an unusable trust domain: {e}"))?;
            let jwks = mayfly::jwt::JwtBundle::new(td, jwt_keys).to_jwks_json();
            out.line(String::from_utf8_lossy(&jwks))
        }
    }
}

/// `audit list|verify`.
pub async fn audit(admin: &mut Admin, cmd: AuditCommand, out: Printer) -> Result<()> {
    match cmd {
        AuditCommand::List {
            task,
            follow,
            after,
            limit,
        } => {
            let mut stream = admin
                .list_audit(pb::ListAuditRequest {
                    after_seq: after,
                    task_id: task.unwrap_or_default(),
                    follow,
                    limit,
                })
                .await
                .map_err(refused)?
                .into_inner();
            if out.json_wanted() {
                while let Some(record) = stream.next().await {
                    out.json_line(&record.map_err(refused)?)?;
                }
                return Ok(());
            }
            let mut table = audit_table();
            if follow {
                // Records arrive one at a time for as long as the user watches: each is
                // printed at once, in columns wide enough for the usual values.
                table = table.with_min_widths(&[5, 34, 14, 8, 24]);
                out.raw(&table.render_header())?;
                while let Some(record) = stream.next().await {
                    push_audit_row(&mut table, &record.map_err(refused)?, SystemTime::now());
                    out.raw(&table.render_new_rows())?;
                }
                return Ok(());
            }
            // Printed a chunk at a time as the stream arrives, so a long log is never held
            // whole: columns take the first chunk's widths.
            let mut printer = PagedPrinter::new(out, "no audit records", audit_rows);
            let mut chunk = Vec::with_capacity(AUDIT_CHUNK);
            while let Some(record) = stream.next().await {
                chunk.push(record.map_err(refused)?);
                if chunk.len() == AUDIT_CHUNK {
                    printer.page(&chunk)?;
                    chunk.clear();
                }
            }
            printer.page(&chunk)?;
            printer.finish()
        }
        AuditCommand::Verify => {
            let answer = admin
                .verify_audit(pb::VerifyAuditRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if out.json_wanted() {
                out.json(&answer)?;
            }
            if !answer.ok {
                return Err(anyhow!(
                    "the audit log has been tampered with: {}",
                    answer.problem
                ));
            }
            if out.json_wanted() {
                return Ok(());
            }
            out.line(format_args!(
                "audit log intact: {} records, hash chain verified",
                answer.records
            ))
        }
    }
}

/// The agent list as a table.
pub fn agent_table(agents: &[pb::Agent], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "SPIFFE ID",
        "ATTESTOR",
        "STATUS",
        "SERIAL",
        "EXPIRES",
        "CREATED",
    ]);
    for a in agents {
        table.push(vec![
            a.spiffe_id.clone(),
            a.attestor.clone(),
            if a.banned { "BANNED" } else { "active" }.to_owned(),
            a.current_serial.clone(),
            when(a.not_after, now),
            when(a.created_at, now),
        ]);
    }
    table
}

/// Audit records printed per chunk by `audit list` (text).
const AUDIT_CHUNK: usize = 500;

/// Audit records as a table at `now`.
fn audit_rows(records: &[pb::AuditRecord], now: SystemTime) -> Table {
    let mut table = audit_table();
    for r in records {
        push_audit_row(&mut table, r, now);
    }
    table
}

/// An empty audit table.
pub fn audit_table() -> Table {
    Table::new(&["SEQ", "TIME", "ACTION", "DECISION", "REASON", "DETAILS"])
}

/// Adds `r` to an audit table. Every value goes into a cell, and the table escapes every cell,
/// so a task ID or attestor name holding a newline or an escape sequence stays inside its row.
pub fn push_audit_row(table: &mut Table, r: &pb::AuditRecord, now: SystemTime) {
    let mut details = Vec::new();
    for (name, value) in [
        ("agent", &r.agent_id),
        ("attestor", &r.attestor),
        ("entry", &r.entry_id),
        ("id", &r.spiffe_id),
        ("task", &r.task_id),
        ("serial", &r.serial),
    ] {
        if !value.is_empty() {
            details.push(format!("{name}={value}"));
        }
    }
    if !r.scopes.is_empty() {
        details.push(format!("scopes={}", r.scopes.join(",")));
    }
    if r.not_after != 0 {
        details.push(format!("expires={}", when(r.not_after, now)));
    }
    table.push(vec![
        format!("#{}", r.seq),
        when_ms(r.time_ms, now),
        r.action.clone(),
        if r.decision.is_empty() {
            "-".to_owned()
        } else {
            r.decision.clone()
        },
        r.reason.clone(),
        details.join(" "),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as a workload could make one: a task ID that tries to end the line, write a
    /// forged record after it and hide the rest with an escape sequence.
    fn forged_record() -> pb::AuditRecord {
        pb::AuditRecord {
            seq: 12,
            time_ms: 1_796_096_232_000,
            action: "task.mint".into(),
            decision: "deny".into(),
            reason: "not a valid task ID\r".into(),
            agent_id: "spiffe://mayfly.local/mayfly/agent/join_token/ab".into(),
            attestor: "join_token\u{1b}]0;owned\u{7}".into(),
            task_id: "x\n#9999 2026-12-01T03:37:12Z token.create allow reason=\"ok\"\u{1b}[8m"
                .into(),
            scopes: vec!["db:read\u{202e}".into()],
            ..pb::AuditRecord::default()
        }
    }

    #[test]
    fn an_audit_record_with_control_characters_is_one_escaped_row() {
        let mut table = audit_table();
        push_audit_row(&mut table, &forged_record(), SystemTime::now());
        let text = table.render();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.lines().nth(1).unwrap().starts_with("#12 "), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("#9999")), "{text}");
        assert!(
            !text
                .chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("task=x\\n#9999"), "{text}");
        // The JSON form keeps the value exactly: JSON escapes by its own rules.
        let json = serde_json::to_string(&forged_record()).unwrap();
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["task_id"], forged_record().task_id);
        assert!(!json.contains('\n') && !json.contains('\u{1b}'));
    }
}
