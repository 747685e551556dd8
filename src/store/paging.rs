//! The SQL of the paged operator lists (see [`super::query`]), written once for both engines:
//! they differ only in how a JSON array of selectors is searched.

use super::query::EntryQuery;

/// The engine a statement is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

/// The text values to bind, in placeholder order, for [`entry_page_sql`]; the limit follows
/// them as an integer.
pub(super) fn entry_page_binds(query: &EntryQuery) -> Vec<String> {
    let mut binds = Vec::new();
    if let Some(parent) = &query.parent_id {
        binds.push(parent.as_str().to_owned());
    }
    if let Some(prefix) = &query.spiffe_id_prefix {
        binds.push(prefix.as_str().to_owned());
        binds.push(prefix.upper_bound());
    }
    for selector in &query.selectors {
        binds.push(selector.as_str().to_owned());
    }
    if let Some(after) = &query.after {
        binds.push(after.spiffe_id.as_str().to_owned());
        binds.push(after.id.as_str().to_owned());
    }
    binds
}

/// One page of entries: `SELECT ... WHERE <filters> ORDER BY spiffe_id, id LIMIT $n`, with
/// placeholders in the order of [`entry_page_binds`], then the limit.
pub(super) fn entry_page_sql(query: &EntryQuery, dialect: Dialect) -> String {
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    let mut conditions = Vec::new();
    if query.parent_id.is_some() {
        conditions.push(format!("parent_id = {}", next()));
    }
    if query.spiffe_id_prefix.is_some() {
        let (low, high) = (next(), next());
        conditions.push(format!("spiffe_id >= {low} AND spiffe_id < {high}"));
    }
    for _ in &query.selectors {
        // Selectors are stored as a JSON array of strings; an entry matches when each
        // selector asked for is one of its elements.
        let p = next();
        conditions.push(match dialect {
            Dialect::Sqlite => format!(
                "EXISTS (SELECT 1 FROM json_each(entries.selectors) AS s WHERE s.value = {p})"
            ),
            Dialect::Postgres => format!("jsonb_exists(selectors::jsonb, {p})"),
        });
    }
    if query.after.is_some() {
        let (spiffe_id, id) = (next(), next());
        conditions.push(format!("(spiffe_id, id) > ({spiffe_id}, {id})"));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    format!(
        concat!(
            "SELECT ",
            super::rows::entry_columns!(),
            " FROM entries{} ORDER BY spiffe_id, id LIMIT {}"
        ),
        filter,
        next()
    )
}

/// One page of agents after an optional SPIFFE ID (`$1` when there is one), then the limit.
pub(super) fn agent_page_sql(after: bool) -> &'static str {
    if after {
        concat!(
            "SELECT ",
            super::rows::agent_columns!(),
            " FROM agents WHERE spiffe_id > $1 ORDER BY spiffe_id LIMIT $2"
        )
    } else {
        concat!(
            "SELECT ",
            super::rows::agent_columns!(),
            " FROM agents ORDER BY spiffe_id LIMIT $1"
        )
    }
}
