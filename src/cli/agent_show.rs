//! `mayfly agent show ID`: one agent's record, the node selectors its attestor proved, and the
//! node groups it is in (issue 12).

use std::time::SystemTime;

use anyhow::Result;
use mayfly::proto::admin as pb;
use mayfly::text::escape;

use super::admin::{Admin, refused};
use super::output::Printer;
use super::time::when;

/// `agent show ID`.
pub async fn show(admin: &mut Admin, id: String, out: Printer) -> Result<()> {
    let detail = admin
        .get_agent(pb::AgentIdRequest { spiffe_id: id })
        .await
        .map_err(refused)?
        .into_inner();
    if out.json_wanted() {
        return out.json(&detail);
    }
    out.raw(&details(&detail, SystemTime::now()))
}

/// The agent as labelled lines, then its node selectors and node groups one a line; every
/// value escaped.
pub fn details(detail: &pb::AgentDetail, now: SystemTime) -> String {
    let agent = detail.agent.clone().unwrap_or_default();
    let or_none = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let fields = [
        ("SPIFFE ID", agent.spiffe_id.clone()),
        ("Attestor", agent.attestor.clone()),
        (
            "Status",
            if agent.banned { "BANNED" } else { "active" }.to_owned(),
        ),
        ("Serial", agent.current_serial.clone()),
        ("Next", or_none(&agent.next_serial)),
        ("Expires", when(agent.not_after, now)),
        ("Created", when(agent.created_at, now)),
    ];
    let mut text: String = fields
        .iter()
        .map(|(label, value)| format!("{:<11}{}\n", format!("{label}:"), escape(value)))
        .collect();
    text.push_str("Node selectors:\n");
    if agent.node_selectors.is_empty() {
        text.push_str("  - (none: a join-token agent is in no node group)\n");
    }
    for s in &agent.node_selectors {
        text.push_str(&format!("  {}\n", escape(s)));
    }
    text.push_str("Node groups:\n");
    if detail.node_groups.is_empty() {
        text.push_str("  - (none)\n");
    }
    for g in &detail.node_groups {
        text.push_str(&format!(
            "  {} (node entry {}: {})\n",
            escape(&g.spiffe_id),
            escape(&g.id),
            escape(&g.selectors.join(", "))
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_shows_its_selectors_and_groups_escaped() {
        let detail = pb::AgentDetail {
            agent: Some(pb::Agent {
                spiffe_id: "spiffe://acme.test/mayfly/agent/x509pop/ab".into(),
                attestor: "x509pop".into(),
                node_selectors: vec![
                    "x509pop:subject:cn:web-1".into(),
                    "x509pop:san:dns:evil\u{1b}[2J".into(),
                ],
                ..Default::default()
            }),
            node_groups: vec![pb::Entry {
                id: "e1".into(),
                spiffe_id: "spiffe://acme.test/nodes/web".into(),
                selectors: vec!["x509pop:subject:cn:web-1".into()],
                node: true,
                ..Default::default()
            }],
        };
        let text = details(&detail, SystemTime::now());
        assert!(text.contains("Attestor:  x509pop\n"), "{text}");
        assert!(text.contains("  x509pop:subject:cn:web-1\n"), "{text}");
        assert!(text.contains("evil\\x1b[2J"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            text.contains(
                "  spiffe://acme.test/nodes/web (node entry e1: x509pop:subject:cn:web-1)\n"
            ),
            "{text}"
        );
        let plain = details(&pb::AgentDetail::default(), SystemTime::now());
        assert!(plain.contains("Node groups:\n  - (none)\n"), "{plain}");
    }
}
