//! The lookup batcher of the SQLite store: the agent and entry lookups of every issuance,
//! gathered under load into one statement per table (see [`serve_lookups`]).

use std::sync::{Arc, LazyLock};

use sqlx::sqlite::SqliteRow;
use sqlx::{FromRow, Row};
use tokio::sync::{mpsc, oneshot};

use super::readers::Readers;
use crate::store::rows::{AgentRow, EntryRow, agent_columns, entry_columns};
use crate::store::{AgentRecord, Entry, StoreError};

/// Lookups waiting for the batcher before callers are made to wait for room: two batches of
/// the largest size, so a full queue means the batcher is a whole batch behind.
pub(super) const LOOKUP_QUEUE: usize = 4 * LOOKUP_SIZES[LOOKUP_SIZES.len() - 1];

/// Looks up one agent by SPIFFE ID.
pub(super) const AGENT_BY_ID: &str = concat!(
    "SELECT ",
    agent_columns!(),
    " FROM agents WHERE spiffe_id = $1"
);
/// Looks up one entry by ID.
pub(super) const ENTRY_BY_ID: &str =
    concat!("SELECT ", entry_columns!(), " FROM entries WHERE id = $1");

/// The sizes a batched lookup is padded to (repeating its last key), so only these few
/// statements are ever prepared; the largest is the most keys one statement asks for.
const LOOKUP_SIZES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// `SELECT … FROM agents WHERE spiffe_id IN (…)` for each size in [`LOOKUP_SIZES`].
static AGENT_LOOKUPS: LazyLock<Vec<String>> = LazyLock::new(|| {
    lookup_statements(concat!(
        "SELECT ",
        agent_columns!(),
        " FROM agents WHERE spiffe_id IN "
    ))
});
/// `SELECT … FROM entries WHERE id IN (…)` for each size in [`LOOKUP_SIZES`].
static ENTRY_LOOKUPS: LazyLock<Vec<String>> = LazyLock::new(|| {
    lookup_statements(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM entries WHERE id IN "
    ))
});

fn lookup_statements(prefix: &str) -> Vec<String> {
    LOOKUP_SIZES
        .iter()
        .map(|&n| format!("{prefix}({})", vec!["?"; n].join(", ")))
        .collect()
}

pub(super) type Reply<T> = oneshot::Sender<Result<Option<T>, StoreError>>;

/// A point lookup waiting for the batcher: the key and where to send the answer.
pub(super) enum Lookup {
    Agent(String, Reply<AgentRecord>),
    Entry(String, Reply<Entry>),
}

/// Answers agent and entry lookups, the two reads of every issuance, in batches: whatever
/// lookups are waiting when a batch starts are asked with one statement per table, so under
/// load the trips to SQLite's threads no longer grow with the request rate. Each statement
/// starts after the lookups it answers were asked, so every caller still reads what was
/// committed before it asked, as with a query of its own.
///
/// It runs on the runtime that opened the store, so that runtime must keep running while the
/// store is used (a current-thread runtime left idle would leave lookups waiting); once that
/// runtime is gone, lookups go straight to the readers.
pub(super) async fn serve_lookups(readers: Arc<Readers>, mut requests: mpsc::Receiver<Lookup>) {
    let most = 2 * LOOKUP_SIZES[LOOKUP_SIZES.len() - 1];
    let mut batch = Vec::with_capacity(most);
    while requests.recv_many(&mut batch, most).await > 0 {
        let mut agents = Vec::new();
        let mut entries = Vec::new();
        for lookup in batch.drain(..) {
            match lookup {
                Lookup::Agent(key, reply) => agents.push((key, reply)),
                Lookup::Entry(key, reply) => entries.push((key, reply)),
            }
        }
        tokio::join!(
            answer_lookups::<AgentRow, AgentRecord>(
                &readers,
                &AGENT_LOOKUPS,
                AGENT_BY_ID,
                "spiffe_id",
                agents
            ),
            answer_lookups::<EntryRow, Entry>(&readers, &ENTRY_LOOKUPS, ENTRY_BY_ID, "id", entries),
        );
    }
}

/// Answers `waiting` lookups of one table, [`LOOKUP_SIZES`]'s largest at a time. Should a
/// batch fail (a database error, a corrupt row), each of its lookups is asked again on its
/// own, so every caller gets exactly the answer a query of its own would have given.
async fn answer_lookups<R, T>(
    readers: &Readers,
    statements: &[String],
    one: &'static str,
    key_column: &str,
    mut waiting: Vec<(String, Reply<T>)>,
) where
    R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    T: TryFrom<R, Error = StoreError> + Clone,
{
    while !waiting.is_empty() {
        let take = waiting.len().min(LOOKUP_SIZES[LOOKUP_SIZES.len() - 1]);
        let chunk: Vec<_> = waiting.drain(..take).collect();
        let size = LOOKUP_SIZES
            .iter()
            .position(|&n| n >= chunk.len())
            .unwrap_or(LOOKUP_SIZES.len() - 1);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statements[size].as_str()));
        for i in 0..LOOKUP_SIZES[size] {
            query = query.bind(chunk[i.min(chunk.len() - 1)].0.as_str());
        }
        let rows = match readers.get().await {
            Ok(mut conn) => query.fetch_all(&mut *conn).await.ok(),
            Err(_) => None,
        };
        let found = rows.and_then(|rows| {
            rows.iter()
                .map(|row| {
                    let key: String = row.try_get(key_column).ok()?;
                    let record = T::try_from(R::from_row(row).ok()?).ok()?;
                    Some((key, record))
                })
                .collect::<Option<Vec<_>>>()
        });
        match found {
            Some(found) => {
                for (key, reply) in chunk {
                    let record = found
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, r)| r.clone());
                    let _ = reply.send(Ok(record));
                }
            }
            None => {
                for (key, reply) in chunk {
                    let _ = reply.send(lookup_one::<R, T>(readers, one, &key).await);
                }
            }
        }
    }
}

/// One lookup by key, on its own.
pub(super) async fn lookup_one<R, T>(
    readers: &Readers,
    sql: &'static str,
    key: &str,
) -> Result<Option<T>, StoreError>
where
    R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    T: TryFrom<R, Error = StoreError>,
{
    sqlx::query_as::<_, R>(sql)
        .bind(key)
        .fetch_optional(&mut *readers.get().await?)
        .await?
        .map(T::try_from)
        .transpose()
}

/// Below this many lookups under way, a lookup skips the batcher: an issuance makes two at
/// once, and a quiet server should answer both without it.
pub(super) const DIRECT_LOOKUPS: usize = 2;
