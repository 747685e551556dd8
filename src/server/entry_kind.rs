//! Node entries beside workload entries (issue 12): which selectors and fields each kind takes.
//!
//! A node entry's parent is the server: it defines a node group (the agents whose node
//! selectors include all of its selectors) and issues nothing, so it takes node selectors only
//! (what a node attestor proved) and no scopes, TTLs, DNS names or hint. A workload entry
//! takes workload selectors only (what the agent reads from the kernel): a node selector there
//! could never match, so the entry would never be served. Both are refused at the operator's
//! door, with nothing stored.

use mayfly_attestors::{Selector, SelectorClass};

use crate::proto::admin as pb;
use crate::server::entry_rules::EntryError;
use crate::store::Entry;

/// Whether an entry is a node entry or a workload entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// Its parent is an agent or a node group: it is issued to workloads.
    Workload,
    /// Its parent is the server: it defines a node group.
    Node,
}

impl EntryKind {
    /// The kind of a stored entry.
    pub(crate) fn of(entry: &Entry) -> Self {
        if crate::store::is_server_id(&entry.parent_id) {
            Self::Node
        } else {
            Self::Workload
        }
    }

    /// Checks that every selector is of the class this kind takes.
    ///
    /// # Errors
    /// [`EntryError::NodeSelectorInWorkloadEntry`] or
    /// [`EntryError::WorkloadSelectorInNodeEntry`], naming the first selector of the other
    /// class.
    pub(crate) fn check_selectors(self, selectors: &[Selector]) -> Result<(), EntryError> {
        let wanted = match self {
            Self::Workload => SelectorClass::Workload,
            Self::Node => SelectorClass::Node,
        };
        match selectors.iter().find(|s| s.class() != wanted) {
            None => Ok(()),
            Some(s) if self == Self::Node => Err(EntryError::WorkloadSelectorInNodeEntry(shown(s))),
            Some(s) => Err(EntryError::NodeSelectorInWorkloadEntry(shown(s))),
        }
    }
}

/// A selector as an error repeats it: escaped and bounded (node selector values are any text).
fn shown(selector: &Selector) -> String {
    crate::text::escape_bounded(selector.as_str(), 200).into_owned()
}

/// Checks that a node entry's create request gives nothing a node entry cannot have.
///
/// # Errors
/// [`EntryError::NodeEntryWithParent`] or [`EntryError::NodeEntryIssuesNothing`] naming the
/// first flag given.
pub(crate) fn check_node_create(req: &pb::CreateEntryRequest) -> Result<(), EntryError> {
    if !req.parent_id.is_empty() {
        return Err(EntryError::NodeEntryWithParent);
    }
    let given = [
        ("--scope", !req.scopes.is_empty()),
        ("--ttl", req.ttl_seconds != 0),
        ("--jwt-ttl", req.jwt_ttl_seconds != 0),
        ("--dns", !req.dns_names.is_empty()),
        ("--hint", !req.hint.is_empty()),
    ];
    match given.into_iter().find(|(_, g)| *g) {
        Some((flag, _)) => Err(EntryError::NodeEntryIssuesNothing(flag)),
        None => Ok(()),
    }
}

/// Checks that an update of a node entry changes only its selectors.
///
/// # Errors
/// [`EntryError::NodeEntryIssuesNothing`] naming the first other flag given.
pub(crate) fn check_node_update(req: &pb::UpdateEntryRequest) -> Result<(), EntryError> {
    let given = [
        ("--scope", req.scopes.is_some()),
        ("--ttl", req.ttl_seconds.is_some()),
        ("--jwt-ttl", req.jwt_ttl_seconds.is_some()),
        ("--dns", req.dns_names.is_some()),
        ("--hint", req.hint.is_some()),
    ];
    match given.into_iter().find(|(_, g)| *g) {
        Some((flag, _)) => Err(EntryError::NodeEntryIssuesNothing(flag)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(texts: &[&str]) -> Vec<Selector> {
        texts.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    #[test]
    fn each_kind_takes_its_own_selectors_only() {
        let node = sel(&["x509pop:subject:cn:web-1", "aws_iid:region:eu-west-1"]);
        let workload = sel(&["unix:uid:1001"]);
        assert!(EntryKind::Node.check_selectors(&node).is_ok());
        assert!(EntryKind::Workload.check_selectors(&workload).is_ok());
        let mixed = [node.clone(), workload.clone()].concat();
        let err = EntryKind::Node.check_selectors(&mixed).unwrap_err();
        assert!(matches!(&err, EntryError::WorkloadSelectorInNodeEntry(s) if s == "unix:uid:1001"));
        assert!(err.to_string().contains("node selectors"), "{err}");
        let err = EntryKind::Workload.check_selectors(&mixed).unwrap_err();
        assert!(
            matches!(&err, EntryError::NodeSelectorInWorkloadEntry(s) if s.starts_with("x509pop:") || s.starts_with("aws_iid:"))
        );
        assert!(err.to_string().contains("--node"), "{err}");
    }

    #[test]
    fn a_node_entry_takes_no_issuance_fields() {
        let bare = pb::CreateEntryRequest {
            spiffe_id: "spiffe://acme.test/nodes/web".into(),
            selectors: vec!["x509pop:subject:cn:web-1".into()],
            node: true,
            ..Default::default()
        };
        assert!(check_node_create(&bare).is_ok());
        let with_parent = pb::CreateEntryRequest {
            parent_id: "spiffe://acme.test/mayfly/server".into(),
            ..bare.clone()
        };
        assert!(matches!(
            check_node_create(&with_parent),
            Err(EntryError::NodeEntryWithParent)
        ));
        let with_scope = pb::CreateEntryRequest {
            scopes: vec!["db:read".into()],
            ..bare.clone()
        };
        assert!(matches!(
            check_node_create(&with_scope),
            Err(EntryError::NodeEntryIssuesNothing("--scope"))
        ));
        let with_ttl = pb::CreateEntryRequest {
            ttl_seconds: 60,
            ..bare
        };
        assert!(matches!(
            check_node_create(&with_ttl),
            Err(EntryError::NodeEntryIssuesNothing("--ttl"))
        ));
        let selectors_only = pb::UpdateEntryRequest {
            selectors: Some(pb::StringList {
                values: vec!["x509pop:subject:cn:web-2".into()],
            }),
            ..Default::default()
        };
        assert!(check_node_update(&selectors_only).is_ok());
        let hint = pb::UpdateEntryRequest {
            hint: Some("x".into()),
            ..selectors_only
        };
        assert!(matches!(
            check_node_update(&hint),
            Err(EntryError::NodeEntryIssuesNothing("--hint"))
        ));
    }
}
