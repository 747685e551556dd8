//! `mayfly entry`: registration entries on the server's admin socket. Each command asks the
//! admin API, then prints what came back: JSON by the admin types' derived `Serialize`, text as
//! aligned tables and escaped fields. Durations are parsed here only to carry them in seconds;
//! whether they are allowed (the floor, the ceiling) is the server's decision, as is every
//! other rule an entry must follow.

use std::time::SystemTime;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use mayfly::proto::admin as pb;
use mayfly::text::escape;
use serde::Serialize;

use super::admin::{Admin, refused};
use super::output::Printer;
use super::paged::PagedPrinter;
use super::table::Table;
use super::time::{compact, when};

/// `mayfly entry`.
#[derive(Subcommand)]
pub enum EntryCommand {
    /// Register a workload, or with --node a node group; prints the entry ID.
    Create(EntryCreateArgs),
    /// List the entries, a page at a time, optionally filtered.
    List(EntryListArgs),
    /// Show one entry.
    Show {
        /// The entry ID.
        id: String,
    },
    /// Change an entry's selectors, scopes, TTLs, DNS names or hint; its agent sees the change
    /// at its next sync. Its SPIFFE ID and parent never change (create another entry instead).
    Update(EntryUpdateArgs),
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
    /// The agent allowed to ask for it (see `mayfly agent list` or `mayfly token generate`), or
    /// a node group's SPIFFE ID: every agent in the group may then ask for it.
    #[arg(long, required_unless_present = "node", conflicts_with = "node")]
    parent_id: Option<String>,
    /// Create a node entry: --spiffe-id names a node group whose members are the agents
    /// having all of --selector's node selectors (e.g. x509pop:subject:cn:web-1). It issues
    /// nothing itself and takes no --parent-id (its parent is the server).
    #[arg(long)]
    node: bool,
    /// TYPE:KIND:VALUE the workload must have, e.g. unix:uid:1001 (repeat for more; all must
    /// match); for a node entry, what the node must have, e.g. x509pop:subject:cn:web-1.
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    /// A scope task SVIDs may carry, e.g. stripe:read:customers (repeat for more).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The longest SVID lifetime for this entry, e.g. 5m or 1h (at most 1h) [default: 5m].
    #[arg(long)]
    ttl: Option<String>,
    /// The longest JWT-SVID lifetime for this entry, e.g. 5m [default: the server's, 5m].
    #[arg(long)]
    jwt_ttl: Option<String>,
    /// A DNS name to put in its SVIDs (repeat for more).
    #[arg(long = "dns", visible_alias = "dns-name")]
    dns_names: Vec<String>,
    /// A short label (at most 64 printable characters) that tells this identity apart from the
    /// workload's others; SPIFFE clients receive it with the SVID.
    #[arg(long, default_value = "")]
    hint: String,
}

/// `mayfly entry update`: every flag is optional, and only what is given changes.
#[derive(Args)]
pub struct EntryUpdateArgs {
    /// The entry ID.
    id: String,
    /// TYPE:KIND:VALUE the workload must have (repeat for more). Given at all, these replace
    /// the entry's whole selector list.
    #[arg(long = "selector")]
    selectors: Vec<String>,
    /// A scope task SVIDs may carry (repeat for more). Given at all, these replace the entry's
    /// whole scope list.
    #[arg(long = "scope", conflicts_with = "clear_scopes")]
    scopes: Vec<String>,
    /// Remove every scope: task SVIDs for the entry can no longer be minted with any.
    #[arg(long)]
    clear_scopes: bool,
    /// The longest SVID lifetime, e.g. 5m or 1h (at most 1h).
    #[arg(long)]
    ttl: Option<String>,
    /// The longest JWT-SVID lifetime, e.g. 5m, or `default` for the server's default.
    #[arg(long)]
    jwt_ttl: Option<String>,
    /// A DNS name to put in its SVIDs (repeat for more). Given at all, these replace the
    /// entry's whole DNS name list.
    #[arg(long = "dns", visible_alias = "dns-name", conflicts_with = "clear_dns")]
    dns_names: Vec<String>,
    /// Remove every DNS name.
    #[arg(long, visible_alias = "clear-dns-names")]
    clear_dns: bool,
    /// The hint (at most 64 printable characters); `--hint ''` removes it.
    #[arg(long)]
    hint: Option<String>,
}

/// `mayfly entry list`: filters (all must hold) and the page size.
#[derive(Args)]
pub struct EntryListArgs {
    /// Only entries whose parent is this agent or node group (a SPIFFE ID); the server's ID
    /// (spiffe://<td>/mayfly/server) lists the node entries.
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

/// `flag`'s duration in whole seconds.
fn seconds(flag: &str, text: &str) -> Result<u32> {
    mayfly::duration::parse_whole_seconds(text).map_err(|e| anyhow!("{flag}: {e}"))
}

/// A JWT TTL as the admin API carries it: `default` is 0, the server's default.
fn jwt_seconds(text: &str) -> Result<u32> {
    if text == "default" {
        return Ok(0);
    }
    seconds("--jwt-ttl", text)
}

/// A list flag as an update carries it: given (or cleared) replaces the list, else unchanged.
fn replacement(values: Vec<String>, clear: bool) -> Option<pb::StringList> {
    (clear || !values.is_empty()).then_some(pb::StringList { values })
}

impl EntryUpdateArgs {
    /// The admin API request, or why the arguments cannot make one.
    fn request(self) -> Result<pb::UpdateEntryRequest> {
        Ok(pb::UpdateEntryRequest {
            id: self.id,
            selectors: replacement(self.selectors, false),
            scopes: replacement(self.scopes, self.clear_scopes),
            ttl_seconds: self.ttl.map(|t| seconds("--ttl", &t)).transpose()?,
            jwt_ttl_seconds: self.jwt_ttl.as_deref().map(jwt_seconds).transpose()?,
            dns_names: replacement(self.dns_names, self.clear_dns),
            hint: self.hint,
        })
    }
}

/// `entry create|list|show|update|delete`.
pub async fn entry(admin: &mut Admin, cmd: EntryCommand, out: Printer) -> Result<()> {
    match cmd {
        EntryCommand::Create(args) => {
            // A node entry takes no TTL: none is sent unless given (the server then names it).
            let ttl = match (&args.ttl, args.node) {
                (Some(t), _) => seconds("--ttl", t)?,
                (None, true) => 0,
                (None, false) => seconds("--ttl", "5m")?,
            };
            let request = pb::CreateEntryRequest {
                spiffe_id: args.spiffe_id,
                parent_id: args.parent_id.unwrap_or_default(),
                node: args.node,
                selectors: args.selectors,
                scopes: args.scopes,
                ttl_seconds: ttl,
                dns_names: args.dns_names,
                hint: args.hint,
                jwt_ttl_seconds: args
                    .jwt_ttl
                    .as_deref()
                    .map(jwt_seconds)
                    .transpose()?
                    .unwrap_or(0),
            };
            let entry = admin
                .create_entry(request)
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
            show(&entry, out)
        }
        EntryCommand::Update(args) => {
            let entry = admin
                .update_entry(args.request()?)
                .await
                .map_err(refused)?
                .into_inner();
            show(&entry, out)
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

/// One entry, as JSON or as labelled lines.
fn show(entry: &pb::Entry, out: Printer) -> Result<()> {
    if out.json_wanted() {
        out.json(entry)
    } else {
        out.raw(&entry_details(entry, SystemTime::now()))
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

/// A JWT TTL as shown: 0 is the server's default.
fn jwt_ttl(seconds: u32) -> String {
    if seconds == 0 {
        "default".to_owned()
    } else {
        ttl(seconds)
    }
}

fn hint_or_none(hint: &str) -> String {
    if hint.is_empty() {
        "-".to_owned()
    } else {
        hint.to_owned()
    }
}

/// What an entry is, as lists show it: `node` (a node group) or `workload`.
fn kind(e: &pb::Entry) -> &'static str {
    if e.node { "node" } else { "workload" }
}

/// The entry list as a table (its cells escaped by the table).
pub fn entry_table(entries: &[pb::Entry], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "ID",
        "KIND",
        "SPIFFE ID",
        "PARENT",
        "SELECTORS",
        "SCOPES",
        "TTL",
        "JWT TTL",
        "DNS",
        "HINT",
        "CREATED",
    ]);
    for e in entries {
        table.push(vec![
            e.id.clone(),
            kind(e).to_owned(),
            e.spiffe_id.clone(),
            e.parent_id.clone(),
            list_or_none(&e.selectors),
            list_or_none(&e.scopes),
            ttl(e.ttl_seconds),
            jwt_ttl(e.jwt_ttl_seconds),
            list_or_none(&e.dns_names),
            hint_or_none(&e.hint),
            when(e.created_at, now),
        ]);
    }
    table
}

/// One entry as labelled lines, each value escaped.
pub fn entry_details(e: &pb::Entry, now: SystemTime) -> String {
    let fields = [
        ("ID", e.id.clone()),
        ("Kind", kind(e).to_owned()),
        ("SPIFFE ID", e.spiffe_id.clone()),
        ("Parent", e.parent_id.clone()),
        ("Selectors", list_or_none(&e.selectors)),
        ("Scopes", list_or_none(&e.scopes)),
        ("TTL", ttl(e.ttl_seconds)),
        ("JWT TTL", jwt_ttl(e.jwt_ttl_seconds)),
        ("DNS", list_or_none(&e.dns_names)),
        ("Hint", hint_or_none(&e.hint)),
        ("Created", when(e.created_at, now)),
    ];
    fields
        .iter()
        .map(|(label, value)| format!("{:<11}{}\n", format!("{label}:"), escape(value)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_shows_as_labelled_lines_with_times_in_rfc3339() {
        let entry = pb::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://mayfly.local/bot".into(),
            ttl_seconds: 300,
            created_at: 1_796_096_052,
            hint: "billing\u{1b}[8m".into(),
            ..pb::Entry::default()
        };
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_096_232);
        let text = entry_details(&entry, now);
        assert!(text.contains("TTL:       5m\n"), "{text}");
        assert!(text.contains("JWT TTL:   default\n"), "{text}");
        assert!(text.contains("Hint:      billing\\x1b[8m\n"), "{text}");
        assert!(
            text.contains("Created:   2026-12-01T03:34:12Z, 3m ago\n"),
            "{text}"
        );
        assert!(!text.contains("1796096052"), "{text}");
    }

    #[test]
    fn update_flags_given_replace_and_flags_left_out_keep() {
        let parse = |args: &[&str]| {
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                args: EntryUpdateArgs,
            }
            let mut argv = vec!["entry-update", "e1"];
            argv.extend_from_slice(args);
            <Cli as clap::Parser>::try_parse_from(argv).map(|c| c.args.request())
        };
        let nothing = parse(&[]).unwrap().unwrap();
        assert!(nothing.selectors.is_none() && nothing.scopes.is_none());
        assert!(nothing.hint.is_none() && nothing.ttl_seconds.is_none());
        let given = parse(&["--scope", "a:b", "--jwt-ttl", "default", "--hint", ""])
            .unwrap()
            .unwrap();
        assert_eq!(given.scopes.unwrap().values, ["a:b"]);
        assert_eq!(given.jwt_ttl_seconds, Some(0));
        assert_eq!(given.hint.as_deref(), Some(""));
        let cleared = parse(&["--clear-scopes", "--clear-dns"]).unwrap().unwrap();
        assert!(cleared.scopes.unwrap().values.is_empty());
        assert!(cleared.dns_names.unwrap().values.is_empty());
        assert!(parse(&["--scope", "a:b", "--clear-scopes"]).is_err());
        assert!(parse(&["--ttl", "soon"]).unwrap().is_err());
    }
}
