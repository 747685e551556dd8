//! The command line's parts: argument types and handlers per area, and the one way to print.

pub mod admin;
pub mod agent_show;
pub mod ca;
pub mod entry;
pub mod output;
pub mod paged;
pub mod run;
pub mod table;
pub mod time;
pub mod workload;
pub mod workload_jwt;
