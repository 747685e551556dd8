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

/// `--jwt --audience A`: a JWT-SVID instead of an X509-SVID.
#[derive(Args)]
pub struct JwtArgs {
    /// A JWT-SVID (printed alone on one line) instead of an X509-SVID.
    #[arg(long, requires = "audience")]
    jwt: bool,
    /// The one audience of the JWT-SVID (the service that will receive it).
    #[arg(long, requires = "jwt")]
    audience: Option<String>,
}

/// `mayfly svid`.
#[derive(Subcommand)]
pub enum SvidCommand {
    /// This workload's identity SVID, from the SPIFFE Workload API (with --jwt: its identity
    /// JWT-SVID for --audience).
    Fetch {
        #[command(flatten)]
        jwt: JwtArgs,
        /// Which of this workload's identities [default: the first-created entry that
        /// matches].
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Asks the agent whether a JWT-SVID is valid for an audience, and prints its claims.
    Validate {
        /// The token, or - to read it from stdin (keeps it out of the process list).
        #[arg(long = "jwt", value_name = "TOKEN")]
        token: String,
        /// The audience it must be for.
        #[arg(long)]
        audience: String,
        /// The agent's socket, unix:///path [default: SPIFFE_ENDPOINT_SOCKET, else .mayfly/agent.sock].
        #[arg(long)]
        socket: Option<String>,
    },
    /// A task SVID with exactly the given scopes, from the task API (with --jwt: a task
    /// JWT-SVID for --audience, printed alone on one line).
    Mint {
        #[command(flatten)]
        jwt: JwtArgs,
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

/// `svid fetch|mint|validate`.
pub async fn svid(cmd: SvidCommand, out: Printer) -> Result<()> {
    let default_socket = PathBuf::from(mayfly::agent::defaults::SOCKET);
    let (workload, svid) = match cmd {
        SvidCommand::Fetch {
            jwt,
            spiffe_id,
            workload,
        } => {
            let path = wc::socket_path(workload.socket.as_deref(), &default_socket)?;
            if let Some(audience) = jwt.audience.filter(|_| jwt.jwt) {
                no_write_for_jwt(&workload)?;
                return super::workload_jwt::fetch(&path, audience, spiffe_id, out).await;
            }
            let svid = wc::fetch_x509_as(wc::connect(&path).await?, spiffe_id.as_deref()).await?;
            (workload, svid)
        }
        SvidCommand::Validate {
            token,
            audience,
            socket,
        } => {
            let path = wc::socket_path(socket.as_deref(), &default_socket)?;
            return super::workload_jwt::validate(&path, token, audience, out).await;
        }
        SvidCommand::Mint {
            jwt,
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
            if let Some(audience) = jwt.audience.filter(|_| jwt.jwt) {
                no_write_for_jwt(&workload)?;
                let request = mayfly::proto::task::MintJwtsvidRequest {
                    task_id: task,
                    scopes,
                    ttl_seconds,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                    audience,
                };
                return super::workload_jwt::mint(&path, request, out).await;
            }
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

/// `--write` saves certificate files; a JWT-SVID is printed instead.
fn no_write_for_jwt(workload: &WorkloadArgs) -> Result<()> {
    if workload.write.is_some() {
        anyhow::bail!(
            "--write saves X509-SVID files; a JWT-SVID is printed on stdout, so redirect it instead"
        );
    }
    Ok(())
}
