//! `mayfly ca`: the CAs of the trust domain, and rotation by hand (SPIRE's `localauthority`).

use std::time::SystemTime;

use anyhow::Result;
use clap::Subcommand;
use mayfly::proto::admin as pb;

use super::admin::{Admin, refused};
use super::output::Printer;
use super::table::Table;
use super::time::when;

/// `mayfly ca`.
#[derive(Subcommand)]
pub enum CaCommand {
    /// List every CA of the trust domain (of every server sharing the store).
    List,
    /// Prepare this server's next CA now: it joins the bundle at once and signs after
    /// `ca activate`.
    Prepare,
    /// Activate this server's prepared CA now; the active one becomes old and signs nothing
    /// more.
    Activate,
    /// Taint a CA that no longer signs: agents re-issue every SVID chained to it.
    Taint {
        /// The CA's ID, as `ca list` shows it.
        id: String,
    },
    /// Revoke a tainted CA that no longer signs: it leaves the bundle, and verifiers refuse
    /// its SVIDs at their next bundle update.
    Revoke {
        /// The CA's ID, as `ca list` shows it.
        id: String,
    },
}

/// The CA list as a table at `now`.
pub fn ca_table(cas: &[pb::Ca], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "ID",
        "STATE",
        "NOT BEFORE",
        "NOT AFTER",
        "TAINTED",
        "REVOKED",
        "UPSTREAM",
        "SERVER",
    ]);
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    for ca in cas {
        table.push(vec![
            ca.id.clone(),
            ca.state.clone(),
            when(ca.not_before, now),
            when(ca.not_after, now),
            yes_no(ca.tainted),
            yes_no(ca.revoked),
            yes_no(ca.upstream),
            if ca.this_server {
                "this one".to_owned()
            } else {
                ca.instance_id.clone()
            },
        ]);
    }
    table
}

/// Runs `mayfly ca ...`.
pub async fn ca(admin: &mut Admin, cmd: CaCommand, out: Printer) -> Result<()> {
    let (verb, answer) = match cmd {
        CaCommand::List => {
            let cas = admin
                .list_cas(pb::ListCasRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .cas;
            return if out.json_wanted() {
                out.json(&cas)
            } else if cas.is_empty() {
                out.line("no CAs")
            } else {
                out.table(&ca_table(&cas, SystemTime::now()))
            };
        }
        CaCommand::Prepare => ("prepared", admin.prepare_ca(pb::PrepareCaRequest {}).await),
        CaCommand::Activate => (
            "activated",
            admin.activate_ca(pb::ActivateCaRequest {}).await,
        ),
        CaCommand::Taint { id } => ("tainted", admin.taint_ca(pb::CaIdRequest { id }).await),
        CaCommand::Revoke { id } => ("revoked", admin.revoke_ca(pb::CaIdRequest { id }).await),
    };
    let ca = answer.map_err(refused)?.into_inner();
    if out.json_wanted() {
        out.json(&ca)
    } else {
        out.line(format_args!(
            "{verb} CA {} (valid until {})",
            ca.id,
            when(ca.not_after, SystemTime::now())
        ))
    }
}
