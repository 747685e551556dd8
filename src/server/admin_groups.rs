//! The admin API's side of node groups (issue 12): a workload entry under a group needs the
//! group to exist, and `GetAgent` shows an agent's node selectors and the groups it is in.

use crate::id::SpiffeId;
use crate::proto::admin as pb;
use crate::server::entry_rules::EntryError;
use crate::store::{AgentRecord, Entry};

use super::{AdminError, AdminService, agent_message, entry_message};

impl AdminService {
    /// Checks that a new entry's parent exists as what it claims to be: an entry whose
    /// parent is neither an agent nor the server is under a node group, which a node entry
    /// must define. (An agent parent may attest later, so agents are not looked up.)
    ///
    /// # Errors
    /// [`EntryError::UnknownNodeGroup`]; [`AdminError::Store`] when the store fails.
    pub(super) async fn check_parent_exists(&self, entry: &Entry) -> Result<(), AdminError> {
        let parent = &entry.parent_id;
        if self.state.policy.is_agent_id(parent) || crate::store::is_server_id(parent) {
            return Ok(());
        }
        let server = crate::wire::server_id(&self.state.td);
        if self
            .state
            .store
            .list_node_entries(&server, Some(parent))
            .await?
            .is_empty()
        {
            return Err(EntryError::UnknownNodeGroup(parent.clone()).into());
        }
        Ok(())
    }

    /// One agent with the node entries whose selectors it all has.
    ///
    /// # Errors
    /// [`AdminError::Invalid`] for a malformed ID, [`AdminError::NotFound`] for an unknown
    /// agent, [`AdminError::Store`] when the store fails.
    pub(super) async fn agent_detail(
        &self,
        req: &pb::AgentIdRequest,
    ) -> Result<pb::AgentDetail, AdminError> {
        let id = SpiffeId::parse(&req.spiffe_id)?;
        let agent: AgentRecord = self.state.store.get_agent(&id).await?.ok_or_else(|| {
            AdminError::NotFound(format!(
                "no agent {id}; `mayfly agent list` shows the agents"
            ))
        })?;
        let server = crate::wire::server_id(&self.state.td);
        let groups = if agent.node_selectors.is_empty() {
            Vec::new()
        } else {
            self.state
                .store
                .list_node_entries(&server, None)
                .await?
                .into_iter()
                .filter(|g| agent.is_member_of(g))
                .map(entry_message)
                .collect()
        };
        Ok(pb::AgentDetail {
            agent: Some(agent_message(agent)),
            node_groups: groups,
        })
    }
}
