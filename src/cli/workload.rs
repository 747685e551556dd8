//! Workload commands on the agent's socket: `svid fetch` (the SPIFFE Workload API) and
//! `svid mint` (the task API).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use mayfly::text::escape;
use mayfly::workload_client as wc;
use serde::Serialize;

use super::output::Printer;
use super::time::when;

/// Where the workload's agent is and where to write what it gives.
#[derive(Args)]
pub struct WorkloadArgs {
    /// The agent's socket, unix:///path [default: SPIFFE_ENDPOINT_SOCKET, else .mayfly/agent.sock].
    #[arg(long)]
    socket: Option<String>,
    /// Write svid.pem (chain), svid.key (0600) and bundle.pem into this directory.
    #[arg(long)]
    write: Option<PathBuf>,
}

/// `mayfly svid`.
#[derive(Subcommand)]
pub enum SvidCommand {
    /// This workload's identity SVID, from the SPIFFE Workload API.
    Fetch(WorkloadArgs),
    /// A task SVID with exactly the given scopes, from the task API.
    Mint {
        /// The task this SVID is for (1-128 of A-Z a-z 0-9 . _ : -), recorded in the audit log.
        #[arg(long)]
        task: String,
        /// A scope the task needs, e.g. stripe:read:customers (repeat for several).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Its lifetime, e.g. 90s or 5m [default: 5m, or the entry's ceiling if lower].
        #[arg(long)]
        ttl: Option<String>,
        /// Which of this workload's identities to use [default: the first that matches].
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
}

/// What `svid fetch|mint --output json` prints.
#[derive(Serialize)]
struct SvidView<'a> {
    spiffe_id: &'a str,
    serial: &'a str,
    /// Unix seconds.
    not_after: i64,
    /// The entry's hint (empty: none; task SVIDs have none).
    hint: &'a str,
    written_to: Option<&'a Path>,
}

/// `svid fetch|mint`.
pub async fn svid(cmd: SvidCommand, out: Printer) -> Result<()> {
    let default_socket = PathBuf::from(mayfly::agent::defaults::SOCKET);
    let (workload, svid) = match cmd {
        SvidCommand::Fetch(workload) => {
            let path = wc::socket_path(workload.socket.as_deref(), &default_socket)?;
            let svid = wc::fetch_x509(wc::connect(&path).await?).await?;
            (workload, svid)
        }
        SvidCommand::Mint {
            task,
            scopes,
            ttl,
            spiffe_id,
            workload,
        } => {
            let ttl_seconds = match ttl {
                Some(t) => {
                    mayfly::duration::parse_whole_seconds(&t).map_err(|e| anyhow!("--ttl: {e}"))?
                }
                None => 0,
            };
            let path = wc::socket_path(workload.socket.as_deref(), &default_socket)?;
            let request = mayfly::proto::task::MintX509svidRequest {
                task_id: task,
                scopes,
                ttl_seconds,
                spiffe_id: spiffe_id.unwrap_or_default(),
            };
            let svid = wc::mint_x509(wc::connect(&path).await?, request).await?;
            (workload, svid)
        }
    };
    if let Some(dir) = &workload.write {
        wc::write_files(dir, &svid)?;
    }
    let (serial, not_after) = svid.leaf_summary().unwrap_or_default();
    if out.json_wanted() {
        return out.json(&SvidView {
            spiffe_id: &svid.spiffe_id,
            serial: &serial,
            not_after,
            hint: &svid.hint,
            written_to: workload.write.as_deref(),
        });
    }
    out.line(format_args!("SPIFFE ID: {}", escape(&svid.spiffe_id)))?;
    if !svid.hint.is_empty() {
        out.line(format_args!("Hint:      {}", escape(&svid.hint)))?;
    }
    out.line(format_args!("Serial:    {}", escape(&serial)))?;
    out.line(format_args!(
        "Expires:   {}",
        when(not_after, SystemTime::now())
    ))?;
    match &workload.write {
        Some(dir) => {
            let dir = dir.display().to_string();
            let dir = escape(&dir);
            out.line(format_args!(
                "Wrote {dir}/svid.pem, {dir}/svid.key and {dir}/bundle.pem"
            ))
        }
        None => out.raw(&mayfly::bundle::to_pem(&svid.chain)),
    }
}
