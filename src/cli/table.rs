//! Aligned text tables. Every cell is escaped with [`mayfly::text::escape`] as the table renders,
//! so no value that a workload, an agent or an unauthenticated caller chose (a task ID, an
//! attestor name, a scope, a reason) can end a row early, forge another, or send a terminal
//! escape sequence: one record is one line, whatever it holds.

use mayfly::text::escape;

/// A table: a header row and rows of cells, columns separated by two spaces.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    /// Least widths per column, so rows printed one at a time (`audit list --follow`) line up.
    min_widths: Vec<usize>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
            min_widths: vec![0; headers.len()],
        }
    }

    /// The same table with each column at least as wide as `widths` says.
    pub fn with_min_widths(mut self, widths: &[usize]) -> Self {
        for (min, &w) in self.min_widths.iter_mut().zip(widths) {
            *min = w;
        }
        self
    }

    /// Adds a row of raw (unescaped) cells; missing cells are empty.
    pub fn push(&mut self, cells: Vec<String>) {
        let mut row: Vec<String> = cells.iter().map(|c| escape(c).into_owned()).collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The header and every row, aligned to the widest cell of each column.
    pub fn render(&self) -> String {
        let widths = self.widths();
        let mut out = render_row(self.headers.iter().map(|h| h.to_string()), &widths);
        for row in &self.rows {
            out.push_str(&render_row(row.iter().cloned(), &widths));
        }
        out
    }

    /// Only the header, at the least widths (for a table printed a row at a time).
    pub fn render_header(&self) -> String {
        render_row(self.headers.iter().map(|h| h.to_string()), &self.widths())
    }

    /// Only the rows, at the least widths or wider where a cell needs it; the rows are then
    /// taken out, so the next call prints only what was pushed since.
    pub fn render_new_rows(&mut self) -> String {
        let widths = self.widths();
        let rows = std::mem::take(&mut self.rows);
        rows.into_iter()
            .map(|row| render_row(row.into_iter(), &widths))
            .collect()
    }

    /// Each column's width as the table would render now (for pages printed one after the
    /// other, which keep the first page's widths as their least).
    pub fn column_widths(&self) -> Vec<usize> {
        self.widths()
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self
            .headers
            .iter()
            .zip(&self.min_widths)
            .map(|(h, &min)| h.chars().count().max(min))
            .collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        widths
    }
}

/// One line: each cell but the last padded to its column's width.
fn render_row(cells: impl Iterator<Item = String>, widths: &[usize]) -> String {
    let cells: Vec<String> = cells.collect();
    let last = cells.len().saturating_sub(1);
    let mut line = String::new();
    for (i, (cell, &width)) in cells.iter().zip(widths).enumerate() {
        if i == last {
            line.push_str(cell);
        } else {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
        }
    }
    line.truncate(line.trim_end().len());
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&["ID", "NAME", "NOTE"]);
        t.push(vec!["1".into(), "short".into(), "a".into()]);
        t.push(vec!["22".into(), "a longer one".into(), "b".into()]);
        assert_eq!(
            t.render(),
            "ID  NAME          NOTE\n1   short         a\n22  a longer one  b\n"
        );
    }

    #[test]
    fn a_cell_with_control_characters_stays_one_escaped_line() {
        let forged = "x\n#9999 2026-12-01T00:00:00Z token.create allow\u{1b}[8m\r\u{202e}";
        let mut t = Table::new(&["SEQ", "TASK"]);
        t.push(vec!["7".into(), forged.into()]);
        let text = t.render();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.lines().any(|l| l.starts_with("#9999")), "{text}");
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\n' || c == '\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("x\\n#9999"), "{text}");
        // Positive control: plain text is shown as it is.
        let mut t = Table::new(&["SEQ", "TASK"]);
        t.push(vec!["7".into(), "refund-4711".into()]);
        assert!(t.render().ends_with("7    refund-4711\n"));
    }

    #[test]
    fn rows_printed_one_at_a_time_use_the_least_widths() {
        let mut t = Table::new(&["A", "B"]).with_min_widths(&[4, 0]);
        assert_eq!(t.render_header(), "A     B\n");
        t.push(vec!["1".into(), "x".into()]);
        assert_eq!(t.render_new_rows(), "1     x\n");
        assert!(t.is_empty());
    }
}
