//! Lists that arrive a page at a time (`entry list`, `agent list`), printed as they come, so
//! the command holds one page however long the list is.
//!
//! JSON is the same one array `--output json` always printed, written element by element.
//! A table takes its column widths from the first page; a later page widens a column only
//! where one of its cells needs it, so columns stay aligned in the usual case.

use std::time::SystemTime;

use anyhow::Result;
use serde::Serialize;

use super::output::Printer;
use super::table::Table;

/// Prints the pages of one list.
pub struct PagedPrinter<T> {
    out: Printer,
    none: &'static str,
    table_of: fn(&[T], SystemTime) -> Table,
    now: SystemTime,
    /// Records printed so far.
    printed: usize,
    /// Column widths of the first page, once printed.
    widths: Option<Vec<usize>>,
}

impl<T: Serialize> PagedPrinter<T> {
    /// A printer writing to `out`: `none` when the list turns out empty, else the table
    /// `table_of` makes of each page (or JSON).
    pub fn new(out: Printer, none: &'static str, table_of: fn(&[T], SystemTime) -> Table) -> Self {
        Self {
            out,
            none,
            table_of,
            now: SystemTime::now(),
            printed: 0,
            widths: None,
        }
    }

    /// Prints one page.
    ///
    /// # Errors
    /// When stdout cannot be written (see [`Printer`]).
    pub fn page(&mut self, items: &[T]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        if self.out.json_wanted() {
            let mut text = String::new();
            for item in items {
                text.push_str(if self.printed == 0 { "[\n" } else { ",\n" });
                // serde_json's pretty array indents each element by two spaces.
                let pretty = serde_json::to_string_pretty(item)?;
                for (i, line) in pretty.lines().enumerate() {
                    if i > 0 {
                        text.push('\n');
                    }
                    text.push_str("  ");
                    text.push_str(line);
                }
                self.printed += 1;
            }
            return self.out.raw(&text);
        }
        let table = (self.table_of)(items, self.now);
        if table.is_empty() {
            return Ok(());
        }
        self.printed += items.len();
        match &self.widths {
            None => {
                self.widths = Some(table.column_widths());
                self.out.table(&table)
            }
            Some(widths) => {
                let mut table = table.with_min_widths(widths);
                self.out.raw(&table.render_new_rows())
            }
        }
    }

    /// Ends the list: closes the JSON array, or says there was nothing.
    ///
    /// # Errors
    /// When stdout cannot be written.
    pub fn finish(self) -> Result<()> {
        match (self.out.json_wanted(), self.printed) {
            (true, 0) => self.out.line("[]"),
            (true, _) => self.out.raw("\n]\n"),
            (false, 0) => self.out.line(self.none),
            (false, _) => Ok(()),
        }
    }
}
