//! ANSI colour codes in build logs (`ESC[1;32m✔`), rendered as CSS classes: the strict CSP allows no
//! inline styles. SGR sequences become `<span class="ansi-b ansi-fg2">`; every other escape sequence is
//! dropped, so no control character reaches the page or the plain-text download.

use maud::{Markup, html};

/// Text attributes in effect.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Style {
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
    /// Colour index 0–15.
    fg: Option<u8>,
    bg: Option<u8>,
}

impl Style {
    fn classes(&self) -> String {
        let mut c = Vec::new();
        if self.bold {
            c.push("ansi-b".to_string());
        }
        if self.dim {
            c.push("ansi-d".to_string());
        }
        if self.italic {
            c.push("ansi-i".to_string());
        }
        if self.underline {
            c.push("ansi-u".to_string());
        }
        if let Some(fg) = self.fg {
            c.push(format!("ansi-fg{fg}"));
        }
        if let Some(bg) = self.bg {
            c.push(format!("ansi-bg{bg}"));
        }
        c.join(" ")
    }

    /// Applies one SGR sequence's parameters.
    fn apply(&mut self, params: &str) {
        let codes: Vec<u16> = if params.is_empty() {
            vec![0]
        } else {
            params.split(';').map(|p| p.parse().unwrap_or(0)).collect()
        };
        let mut i = 0;
        while i < codes.len() {
            match codes[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                c @ 30..=37 => self.fg = Some((c - 30) as u8),
                39 => self.fg = None,
                c @ 40..=47 => self.bg = Some((c - 40) as u8),
                49 => self.bg = None,
                c @ 90..=97 => self.fg = Some((c - 90 + 8) as u8),
                c @ 100..=107 => self.bg = Some((c - 100 + 8) as u8),
                c @ (38 | 48) => {
                    // 38;5;n (256 colours: the first 16 map to classes) or 38;2;r;g;b (not kept).
                    let colour = match codes.get(i + 1) {
                        Some(5) => {
                            let n = codes.get(i + 2).copied();
                            i += 2;
                            n.filter(|n| *n < 16).map(|n| n as u8)
                        }
                        Some(2) => {
                            i += 4;
                            None
                        }
                        _ => None,
                    };
                    if c == 38 {
                        self.fg = colour;
                    } else {
                        self.bg = colour;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// A piece of text and the style it is shown in.
fn segments(text: &str) -> Vec<(Style, String)> {
    let mut out: Vec<(Style, String)> = Vec::new();
    let mut style = Style::default();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            if !c.is_control() || c == '\t' {
                current.push(c);
            }
            continue;
        }
        // An escape sequence: CSI (`ESC [ params final`) or a two-character one; only SGR (`m`) counts.
        if chars.peek() != Some(&'[') {
            chars.next();
            continue;
        }
        chars.next();
        let mut params = String::new();
        let mut last = None;
        for c in chars.by_ref() {
            if ('\u{40}'..='\u{7e}').contains(&c) {
                last = Some(c);
                break;
            }
            params.push(c);
        }
        if last == Some('m') {
            let mut next = style;
            next.apply(&params);
            if next != style {
                if !current.is_empty() {
                    out.push((style, std::mem::take(&mut current)));
                }
                style = next;
            }
        }
    }
    if !current.is_empty() {
        out.push((style, current));
    }
    out
}

/// The line with its colours as classes.
pub fn render(text: &str) -> Markup {
    let parts = segments(text);
    html! {
        @for (style, text) in &parts {
            @if *style == Style::default() { (text) } @else { span class=(style.classes()) { (text) } }
        }
    }
}

/// The line without escape sequences or control characters.
pub fn strip(text: &str) -> String {
    if !text.contains(|c: char| c.is_control()) {
        return text.to_string();
    }
    segments(text).into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_become_classes_and_text_is_escaped() {
        let html = render("\u{1b}[1m\u{1b}[32m✔\u{1b}[0m done <b>").into_string();
        assert_eq!(html, "<span class=\"ansi-b ansi-fg2\">✔</span> done &lt;b&gt;");
    }

    #[test]
    fn other_sequences_and_controls_are_dropped() {
        assert_eq!(strip("\u{1b}[2K\u{1b}[1;91merror\u{1b}[39m: x\u{7}"), "error: x");
        assert_eq!(render("\u{1b}[38;5;208morange\u{1b}[m").into_string(), "orange");
        assert_eq!(
            render("\u{1b}[38;5;9mred").into_string(),
            "<span class=\"ansi-fg9\">red</span>"
        );
    }
}
