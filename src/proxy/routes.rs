//! The proxy's HTTP route rules: `METHOD /prefix scope`, first match wins, no match is a 403.
//!
//! Paths are matched on whole segments (`/customers` covers `/customers/42`, never
//! `/customers-admin`), and a request path that is not in normal form (`.` or `..` segments,
//! empty segments, percent-encoded `/`, `.` or `%`) is refused before any rule is consulted:
//! the upstream might normalize it into a path that a different rule governs.

use std::fmt;

use crate::id::{IdError, Scope, ScopedId};

/// Why a route rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The rule is not three words.
    #[error(
        "route '{0}' is not 'METHOD /prefix scope' (for example 'GET /customers stripe:read:customers'; '*' for any method, '-' for no scope)"
    )]
    Shape(String),
    /// The method is not an HTTP method token.
    #[error("route '{0}': '{1}' is not an HTTP method (write GET, POST, … or '*')")]
    Method(String, String),
    /// The prefix is not an absolute, normal path.
    #[error(
        "route '{0}': the prefix must be an absolute path in normal form, such as /customers (no '.', '..', '//', '%', '?' or '#')"
    )]
    Prefix(String),
    /// The scope is malformed.
    #[error("route '{0}': {1}")]
    Scope(String, IdError),
}

/// Which methods a route covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MethodMatch {
    /// Any method (`*`).
    Any,
    /// Exactly this one.
    Exact(http::Method),
}

/// One rule: requests with this method under this prefix need this scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    method: MethodMatch,
    prefix: String,
    /// `None` for a route open to every authorized peer (`-`).
    scope: Option<Scope>,
}

impl Route {
    /// Parses `METHOD /prefix scope`.
    ///
    /// # Errors
    /// [`RouteError`] naming the part that is wrong.
    pub fn parse(rule: &str) -> Result<Self, RouteError> {
        let words: Vec<&str> = rule.split_whitespace().collect();
        let [method, prefix, scope] = words.as_slice() else {
            return Err(RouteError::Shape(rule.to_owned()));
        };
        let method = match *method {
            "*" => MethodMatch::Any,
            m => MethodMatch::Exact(
                http::Method::from_bytes(m.as_bytes())
                    .ok()
                    .filter(|_| m.bytes().all(|b| b.is_ascii_uppercase()))
                    .ok_or_else(|| RouteError::Method(rule.to_owned(), m.to_owned()))?,
            ),
        };
        if !prefix.starts_with('/') || check_path(prefix).is_err() || prefix.contains(['?', '#']) {
            return Err(RouteError::Prefix(rule.to_owned()));
        }
        let scope = match *scope {
            "-" => None,
            s => Some(Scope::parse(s).map_err(|e| RouteError::Scope(rule.to_owned(), e))?),
        };
        Ok(Self {
            method,
            prefix: prefix.trim_end_matches('/').to_owned(),
            scope,
        })
    }

    /// Whether this route covers `method` on `path` (a path in normal form).
    pub(crate) fn covers(&self, method: &http::Method, path: &str) -> bool {
        let method_ok = match &self.method {
            MethodMatch::Any => true,
            MethodMatch::Exact(m) => m == method,
        };
        // The prefix "/" was trimmed to "", which covers every path.
        method_ok
            && (path == self.prefix
                || path
                    .strip_prefix(self.prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('/')))
    }

    /// The scope it requires, if any.
    pub fn scope(&self) -> Option<&Scope> {
        self.scope.as_ref()
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = match &self.method {
            MethodMatch::Any => "*",
            MethodMatch::Exact(m) => m.as_str(),
        };
        let prefix = if self.prefix.is_empty() {
            "/"
        } else {
            &self.prefix
        };
        let scope = self.scope.as_ref().map_or("-", Scope::as_str);
        write!(f, "{method} {prefix} {scope}")
    }
}

/// Why a request path was refused before routing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// A `.`, `..` or empty segment, or an encoded separator.
    #[error(
        "the request path is not in normal form ('.', '..', '//' or an encoded '/', '.' or '%'); send the canonical path"
    )]
    NotNormal,
}

/// Refuses paths an upstream could normalize into another route's territory.
///
/// # Errors
/// [`PathError::NotNormal`].
pub(crate) fn check_path(path: &str) -> Result<(), PathError> {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%2e")
        || lower.contains("%5c")
        || lower.contains("%25")
        || path.contains('\\')
    {
        return Err(PathError::NotNormal);
    }
    let body = path.strip_prefix('/').ok_or(PathError::NotNormal)?;
    if body.is_empty() {
        return Ok(());
    }
    let body = body.strip_suffix('/').unwrap_or(body);
    if body
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(PathError::NotNormal);
    }
    Ok(())
}

/// What the route table decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Forward it.
    Allow {
        /// The route that matched.
        route: String,
    },
    /// Answer 403 with this one-line reason.
    Deny(String),
    /// Answer 400: the path is not in normal form.
    BadPath(PathError),
}

/// Ordered route rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes(Vec<Route>);

impl Routes {
    /// Parses every rule, in order.
    ///
    /// # Errors
    /// The first [`RouteError`].
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, RouteError> {
        rules
            .iter()
            .map(|r| Route::parse(r.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Decides a request from `peer` for `method` on `path`: the first covering route's scope
    /// must be among the peer's scopes (exactly, as a whole scope).
    pub(crate) fn decide(&self, peer: &ScopedId, method: &http::Method, path: &str) -> Decision {
        if let Err(e) = check_path(path) {
            return Decision::BadPath(e);
        }
        let Some(route) = self.0.iter().find(|r| r.covers(method, path)) else {
            return Decision::Deny(format!("no route allows {method} {path}"));
        };
        match route.scope() {
            Some(scope) if !peer.grants(scope) => Decision::Deny(format!(
                "{method} {path} needs scope {scope}, which {} does not carry",
                peer.base()
            )),
            _ => Decision::Allow {
                route: route.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::SpiffeId;

    fn peer(id: &str) -> ScopedId {
        ScopedId::from_spiffe_id(&SpiffeId::parse(id).unwrap()).unwrap()
    }

    fn routes() -> Routes {
        Routes::parse(&[
            "GET /customers stripe:read:customers",
            "POST /refunds stripe:write:refunds",
            "GET /health -",
        ])
        .unwrap()
    }

    #[test]
    fn the_first_covering_route_decides_on_whole_segments() {
        let read = peer("spiffe://t.test/bot/scope/stripe.read.customers");
        let get = http::Method::GET;
        assert!(matches!(
            routes().decide(&read, &get, "/customers"),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            routes().decide(&read, &get, "/customers/42"),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            routes().decide(&read, &get, "/customers-admin"),
            Decision::Deny(_)
        ));
        assert!(matches!(
            routes().decide(&read, &http::Method::POST, "/refunds"),
            Decision::Deny(r) if r.contains("stripe:write:refunds")
        ));
        assert!(matches!(
            routes().decide(&read, &get, "/health"),
            Decision::Allow { .. }
        ));
        let plain = peer("spiffe://t.test/bot");
        assert!(matches!(
            routes().decide(&plain, &get, "/customers"),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn paths_an_upstream_could_rewrite_are_refused() {
        let read = peer("spiffe://t.test/bot/scope/stripe.read.customers");
        for path in [
            "/customers/../refunds",
            "/customers/./x",
            "/customers//x",
            "/customers%2f..%2frefunds",
            "/customers/%2E%2E/refunds",
            "/customers\\..\\refunds",
            "/customers/%252e",
        ] {
            assert!(
                matches!(
                    routes().decide(&read, &http::Method::GET, path),
                    Decision::BadPath(_)
                ),
                "{path}"
            );
        }
        assert!(check_path("/customers/42/").is_ok());
        assert!(check_path("/").is_ok());
    }

    #[test]
    fn malformed_rules_are_refused_with_the_part_named() {
        assert!(matches!(Route::parse("GET /x"), Err(RouteError::Shape(_))));
        assert!(matches!(
            Route::parse("get /x a:b"),
            Err(RouteError::Method(..))
        ));
        assert!(matches!(
            Route::parse("GET x a:b"),
            Err(RouteError::Prefix(_))
        ));
        assert!(matches!(
            Route::parse("GET /a/../b a:b"),
            Err(RouteError::Prefix(_))
        ));
        assert!(matches!(
            Route::parse("GET /a A:B"),
            Err(RouteError::Scope(..))
        ));
        assert_eq!(Route::parse("* / -").unwrap().to_string(), "* / -");
        assert!(
            Route::parse("* / -")
                .unwrap()
                .covers(&http::Method::DELETE, "/anything")
        );
    }
}
