//! A report page as data (title, summary, sections with charts and tables) and its two
//! renderings: a self-contained HTML file (inline CSS and SVG, no scripts, no external
//! resources; well-formed XML so that it can be checked with an XML parser) and Markdown
//! (the same text and tables, without the charts). Tables also render as CSV.

use std::fmt::Write;

/// A table: header and rows of cells, already formatted.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// A section: a heading, paragraphs, charts (SVG strings) and tables.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub title: String,
    pub text: Vec<String>,
    pub charts: Vec<String>,
    pub tables: Vec<Table>,
}

/// A whole page.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub title: String,
    /// One line under the title (inputs, generator).
    pub subtitle: String,
    /// The written summary: short sentences with the headline numbers.
    pub summary: Vec<String>,
    pub sections: Vec<Section>,
    /// Files written next to the page, listed at the end.
    pub files: Vec<String>,
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

const CSS: &str = "body{font-family:sans-serif;margin:24px auto;max-width:1360px;color:#222;line-height:1.45}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.sub{color:#666;margin-top:0}.summary{background:#f4f8fb;border-left:4px solid #0072b2;padding:8px 18px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts svg{border:1px solid #e4e4e4;max-width:100%;height:auto}
table{border-collapse:collapse;margin:10px 0 18px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:bold;padding:4px 0}";

/// Renders the page as one self-contained HTML document.
pub fn html(p: &Page) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "<!DOCTYPE html>");
    let _ = writeln!(o, "<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>");
    let _ = writeln!(
        o,
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
    );
    let _ = writeln!(o, "<title>{}</title>", esc(&p.title));
    let _ = writeln!(o, "<style>{CSS}</style>\n</head>\n<body>");
    let _ = writeln!(o, "<h1>{}</h1>", esc(&p.title));
    let _ = writeln!(o, "<p class=\"sub\">{}</p>", esc(&p.subtitle));
    if !p.summary.is_empty() {
        let _ = writeln!(o, "<div class=\"summary\"><h2>Summary</h2><ul>");
        for s in &p.summary {
            let _ = writeln!(o, "<li>{}</li>", esc(s));
        }
        let _ = writeln!(o, "</ul></div>");
    }
    for s in &p.sections {
        let _ = writeln!(o, "<h2>{}</h2>", esc(&s.title));
        for t in &s.text {
            let _ = writeln!(o, "<p>{}</p>", esc(t));
        }
        if !s.charts.is_empty() {
            let _ = writeln!(o, "<div class=\"charts\">");
            for c in &s.charts {
                let _ = writeln!(o, "{}", strip_xml_decl(c));
            }
            let _ = writeln!(o, "</div>");
        }
        for t in &s.tables {
            table_html(&mut o, t);
        }
    }
    if !p.files.is_empty() {
        let _ = writeln!(
            o,
            "<h2>Data</h2><p>Written next to this page: {}.</p>",
            esc(&p.files.join(", "))
        );
    }
    let _ = writeln!(o, "</body>\n</html>");
    o
}

fn strip_xml_decl(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

fn table_html(o: &mut String, t: &Table) {
    let _ = writeln!(o, "<table>");
    if !t.caption.is_empty() {
        let _ = writeln!(o, "<caption>{}</caption>", esc(&t.caption));
    }
    let _ = write!(o, "<tr>");
    for h in &t.header {
        let _ = write!(o, "<th>{}</th>", esc(h));
    }
    let _ = writeln!(o, "</tr>");
    for r in &t.rows {
        let _ = write!(o, "<tr>");
        for c in r {
            let _ = write!(o, "<td>{}</td>", esc(c));
        }
        let _ = writeln!(o, "</tr>");
    }
    let _ = writeln!(o, "</table>");
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Renders the page as Markdown: summary, section text and tables (charts are in the HTML).
pub fn markdown(p: &Page) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# {}\n\n{}\n", p.title, p.subtitle);
    if !p.summary.is_empty() {
        let _ = writeln!(o, "## Summary\n");
        for s in &p.summary {
            let _ = writeln!(o, "- {s}");
        }
        let _ = writeln!(o);
    }
    for s in &p.sections {
        let _ = writeln!(o, "## {}\n", s.title);
        for t in &s.text {
            let _ = writeln!(o, "{t}\n");
        }
        for t in &s.tables {
            if !t.caption.is_empty() {
                let _ = writeln!(o, "**{}**\n", t.caption);
            }
            let _ = writeln!(
                o,
                "| {} |",
                t.header
                    .iter()
                    .map(|h| md_cell(h))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = writeln!(
                o,
                "|{}|",
                t.header
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if i == 0 { "---" } else { "---:" })
                    .collect::<Vec<_>>()
                    .join("|")
            );
            for r in &t.rows {
                let _ = writeln!(
                    o,
                    "| {} |",
                    r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | ")
                );
            }
            let _ = writeln!(o);
        }
    }
    if !p.files.is_empty() {
        let _ = writeln!(o, "Data: {}.", p.files.join(", "));
    }
    o
}

/// One CSV field, quoted when it holds a comma, quote or newline (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Renders rows (header first) as CSV.
pub fn csv(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut o = header.join(",");
    o.push('\n');
    for r in rows {
        o.push_str(&r.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
        o.push('\n');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_quotes() {
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(
            csv(&["x", "y"], &[vec!["1".into(), "2".into()]]),
            "x,y\n1,2\n"
        );
    }
}
