//! Operator commands on the server's admin socket: join tokens, entries, agents, the bundle and
//! the audit log. Each asks the admin API, then prints what came back: JSON by the admin types'
//! derived `Serialize`, text as aligned tables and escaped fields.

use std::time::SystemTime;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use mayfly::proto::admin as pb;
use mayfly::text::escape;
use serde::Serialize;
use tonic::transport::Channel;

use super::output::Printer;
use super::paged::PagedPrinter;
use super::table::Table;
use super::time::{compact, when, when_ms};

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

/// `mayfly entry`.
#[derive(Subcommand)]
pub enum EntryCommand {
    /// Register a workload; prints the entry ID.
    Create(EntryCreateArgs),
    /// List the entries, a page at a time, optionally filtered.
    List(EntryListArgs),
    /// Show one entry.
    Show {
        /// The entry ID.
        id: String,
    },
    /// Delete an entry: its workloads get nothing more.
    Delete {
        /// The entry ID.
        id: String,
    },
}

/// `mayfly entry create`.
#[derive(Args)]
pub struct EntryCreateArgs {
    /// The workload's identity, e.g. spiffe://mayfly.local/agents/billing-bot.
    #[arg(long)]
    spiffe_id: String,
    /// The agent allowed to ask for it (see `mayfly agent list` or `mayfly token generate`).
    #[arg(long)]
    parent_id: String,
    /// TYPE:KIND:VALUE the workload must have, e.g. unix:uid:1001 (repeat for more; all must match).
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    /// A scope task SVIDs may carry, e.g. stripe:read:customers (repeat for more).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The longest SVID lifetime for this entry, e.g. 5m or 1h (at most 1h).
    #[arg(long, default_value = "5m")]
    ttl: String,
    /// A DNS name to put in its SVIDs (repeat for more).
    #[arg(long = "dns")]
    dns_names: Vec<String>,
}

/// `mayfly entry list`: filters (all must hold) and the page size.
#[derive(Args)]
pub struct EntryListArgs {
    /// Only entries whose parent is this agent (a SPIFFE ID).
    #[arg(long)]
    parent_id: Option<String>,
    /// Only entries whose SPIFFE ID begins with this text, e.g. spiffe://acme.test/agents/.
    #[arg(long)]
    spiffe_id_prefix: Option<String>,
    /// Only entries having this selector, TYPE:KIND:VALUE (repeat: entries having all of them).
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// Entries fetched per request (the server caps it at 1000).
    #[arg(long, default_value_t = 500)]
    page_size: u32,
}

/// `mayfly agent list|ban|evict`.
#[derive(Subcommand)]
pub enum AgentAdminCommand {
    /// List the attested agents.
    List,
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

/// `entry create|list|show|delete`.
pub async fn entry(admin: &mut Admin, cmd: EntryCommand, out: Printer) -> Result<()> {
    match cmd {
        EntryCommand::Create(args) => {
            // The TTL is parsed here only to carry it in seconds; whether it is allowed (the
            // ceiling, the floor) is the server's decision.
            let ttl_seconds = mayfly::duration::parse_whole_seconds(&args.ttl)
                .map_err(|e| anyhow!("--ttl: {e}"))?;
            let entry = admin
                .create_entry(pb::CreateEntryRequest {
                    spiffe_id: args.spiffe_id,
                    parent_id: args.parent_id,
                    selectors: args.selectors,
                    scopes: args.scopes,
                    ttl_seconds,
                    dns_names: args.dns_names,
                })
                .await
                .map_err(refused)?
                .into_inner();
            if out.json_wanted() {
                out.json(&entry)
            } else {
                out.line(escape(&entry.id))
            }
        }
        EntryCommand::List(args) => {
            let mut printer = PagedPrinter::new(out, "no entries", entry_table);
            let mut request = pb::ListEntriesRequest {
                page_size: args.page_size,
                page_token: String::new(),
                parent_id: args.parent_id.unwrap_or_default(),
                spiffe_id_prefix: args.spiffe_id_prefix.unwrap_or_default(),
                selectors: args.selectors,
            };
            loop {
                let page = admin
                    .list_entries(request.clone())
                    .await
                    .map_err(refused)?
                    .into_inner();
                printer.page(&page.entries)?;
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            printer.finish()
        }
        EntryCommand::Show { id } => {
            let entry = admin
                .get_entry(pb::EntryIdRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            if out.json_wanted() {
                out.json(&entry)
            } else {
                out.raw(&entry_details(&entry, SystemTime::now()))
            }
        }
        EntryCommand::Delete { id } => {
            admin
                .delete_entry(pb::EntryIdRequest { id: id.clone() })
                .await
                .map_err(refused)?;
            #[derive(Serialize)]
            struct Deleted {
                deleted: String,
            }
            if out.json_wanted() {
                out.json(&Deleted { deleted: id })
            } else {
                out.line(format_args!("deleted entry {}", escape(&id)))
            }
        }
    }
}

/// `agent list|ban|evict`.
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

fn list_or_none(values: &[String]) -> String {
    if values.is_empty() {
        "-".to_owned()
    } else {
        values.join(", ")
    }
}

fn ttl(seconds: u32) -> String {
    compact(std::time::Duration::from_secs(u64::from(seconds)))
}

/// The entry list as a table (its cells escaped by the table).
pub fn entry_table(entries: &[pb::Entry], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "ID",
        "SPIFFE ID",
        "PARENT",
        "SELECTORS",
        "SCOPES",
        "TTL",
        "DNS",
        "CREATED",
    ]);
    for e in entries {
        table.push(vec![
            e.id.clone(),
            e.spiffe_id.clone(),
            e.parent_id.clone(),
            list_or_none(&e.selectors),
            list_or_none(&e.scopes),
            ttl(e.ttl_seconds),
            list_or_none(&e.dns_names),
            when(e.created_at, now),
        ]);
    }
    table
}

/// One entry as labelled lines, each value escaped.
pub fn entry_details(e: &pb::Entry, now: SystemTime) -> String {
    let fields = [
        ("ID", e.id.clone()),
        ("SPIFFE ID", e.spiffe_id.clone()),
        ("Parent", e.parent_id.clone()),
        ("Selectors", list_or_none(&e.selectors)),
        ("Scopes", list_or_none(&e.scopes)),
        ("TTL", ttl(e.ttl_seconds)),
        ("DNS", list_or_none(&e.dns_names)),
        ("Created", when(e.created_at, now)),
    ];
    fields
        .iter()
        .map(|(label, value)| format!("{:<11}{}\n", format!("{label}:"), escape(value)))
        .collect()
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

    #[test]
    fn an_entry_shows_as_labelled_lines_with_times_in_rfc3339() {
        let entry = pb::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://mayfly.local/bot".into(),
            ttl_seconds: 300,
            created_at: 1_796_096_052,
            ..pb::Entry::default()
        };
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_096_232);
        let text = entry_details(&entry, now);
        assert!(text.contains("TTL:       5m\n"), "{text}");
        assert!(
            text.contains("Created:   2026-12-01T03:34:12Z, 3m ago\n"),
            "{text}"
        );
        assert!(!text.contains("1796096052"), "{text}");
    }
}
