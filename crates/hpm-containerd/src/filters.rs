//! containerd's list filters (`github.com/containerd/containerd/filters`), parsed and matched
//! against our [`Info`]. Owns the syntax and the meaning of each field path; never touches a
//! snapshotter (the service lists, then filters).
//!
//! A List request carries any number of filter strings, OR'ed; none (or an empty string)
//! matches everything. A filter is comma-separated selectors, AND'ed. A selector is
//! `fieldpath`, `fieldpath==value`, `fieldpath!=value` or `fieldpath~=regexp`:
//! - a field path is fields joined by `.`; a field is `[A-Za-z0-9_]+` or a quoted string, so
//!   `labels."containerd.io/snapshot.ref"` names one label;
//! - a value is quoted, or bare: everything up to the next `,` or white space (it may not
//!   start with `.`, `,`, `=`, `!` or `~`);
//! - quotes are `"…"`, `/…/` or `|…|` (the last two spare regular expressions some
//!   escaping), with Go's escapes (`\n`, `\t`, `\\`, `\x41`, `\101`, `\u00e9`, … and a
//!   backslash before the quote character itself); white space between tokens is skipped.
//!
//! Field paths, as containerd's snapshot adaptor defines them: `name`, `kind` (`view`,
//! `active`, `committed`), `parent`, `labels.<key>` (the rest of the path, joined by `.`, is
//! the key). A bare field path matches when the field is present: always for `name` and
//! `kind`, when there is a parent for `parent` (containerd's adaptor calls an empty parent
//! present; we do not, so `parent` alone selects the snapshots that have one), and when the
//! key exists (even with an empty value) for a label. `==` needs the field present and equal;
//! `!=` compares the value, missing being the empty string, so `labels.x!=y` matches the
//! snapshots without label `x`. `~=` is an unanchored search with the `regex` crate, whose
//! syntax is RE2's like Go's `regexp`; a regular expression that does not compile is an
//! error of the filter (containerd would silently match nothing). Unknown field paths are
//! never present.

use std::fmt;

use regex::Regex;

use crate::types::{Code, Error, Info};

/// Parsed List filters: matches when any filter matches (or when there are none).
#[derive(Debug)]
pub(crate) struct Filters {
    any: Vec<Filter>,
}

/// One filter string: matches when all its selectors match (an empty string has none).
#[derive(Debug)]
struct Filter {
    all: Vec<Selector>,
}

#[derive(Debug)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// A filter string that does not parse: the string, where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FilterError {
    /// The whole filter string.
    pub filter: String,
    /// Byte offset in it where parsing failed.
    pub at: usize,
    /// What was wrong there.
    pub reason: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "filter {:?} is invalid at byte {}: {}; the syntax is `field==value`, `field!=value`, \
             `field~=regexp` or `field`, joined by `,`",
            self.filter, self.at, self.reason
        )
    }
}

impl From<FilterError> for Error {
    fn from(e: FilterError) -> Self {
        Error::new(Code::InvalidArgument, e.to_string())
    }
}

impl Filters {
    /// Parses the filter strings of a List request.
    pub(crate) fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Self, FilterError> {
        let any = filters
            .iter()
            .map(|f| Parser::new(f.as_ref()).filter())
            .collect::<Result<_, _>>()?;
        Ok(Self { any })
    }

    /// Whether `info` passes.
    pub(crate) fn matches(&self, info: &Info) -> bool {
        self.any.is_empty() || self.any.iter().any(|f| f.matches(info))
    }
}

impl Filter {
    fn matches(&self, info: &Info) -> bool {
        self.all.iter().all(|s| s.matches(info))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.fieldpath);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value == Some(want.as_str()),
            Op::NotEqual(want) => value.unwrap_or("") != want,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

/// The value at `fieldpath`, `None` when not present (see the module doc).
fn field<'a>(info: &'a Info, fieldpath: &[String]) -> Option<&'a str> {
    let (first, rest) = fieldpath.split_first()?;
    match first.as_str() {
        "name" => Some(&info.name),
        "kind" => Some(info.kind.as_str()),
        "parent" => info.parent.as_deref(),
        "labels" => info.labels.get(&rest.join(".")).map(String::as_str),
        _ => None,
    }
}

/// Recursive descent over one filter string, byte offsets into it for errors.
struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Self { input, pos: 0 }
    }

    fn error(&self, at: usize, reason: impl Into<String>) -> FilterError {
        FilterError {
            filter: self.input.to_owned(),
            at,
            reason: reason.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    /// The next character after white space, not consumed.
    fn peek(&mut self) -> Option<char> {
        self.skip_space();
        self.rest().chars().next()
    }

    /// filter := "" | selector ("," selector)*
    fn filter(mut self) -> Result<Filter, FilterError> {
        if self.input.is_empty() {
            return Ok(Filter { all: Vec::new() });
        }
        let mut all = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(Filter { all }),
                Some(',') => {
                    self.pos += 1;
                    all.push(self.selector()?);
                }
                Some(c) => {
                    return Err(self.error(self.pos, format!("unexpected {c:?} after a selector")))
                }
            }
        }
    }

    /// selector := fieldpath [operator value]
    fn selector(&mut self) -> Result<Selector, FilterError> {
        let fieldpath = self.fieldpath()?;
        let op = match self.peek() {
            None | Some(',') => Op::Present,
            Some('=' | '!' | '~') => {
                let at = self.pos;
                let len = self
                    .rest()
                    .find(|c| !matches!(c, '=' | '!' | '~'))
                    .unwrap_or(self.rest().len());
                let operator = &self.rest()[..len];
                self.pos += len;
                let value_at = self.pos;
                let value = self.value()?;
                match operator {
                    "==" => Op::Equal(value),
                    "!=" => Op::NotEqual(value),
                    "~=" => Op::Matches(Regex::new(&value).map_err(|e| {
                        self.error(value_at, format!("bad regular expression: {e}"))
                    })?),
                    _ => {
                        return Err(self.error(
                            at,
                            format!("unknown operator {operator:?} (use ==, != or ~=)"),
                        ))
                    }
                }
            }
            Some(c) => {
                return Err(self.error(
                    self.pos,
                    format!("expected an operator (==, != or ~=), found {c:?}"),
                ))
            }
        };
        Ok(Selector { fieldpath, op })
    }

    /// fieldpath := field ("." field)*
    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    /// field := quoted | [A-Za-z0-9_]+
    fn field(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some(q) if is_quote(q) => self.quoted(),
            Some(c) if is_field_char(c) => {
                let len = self
                    .rest()
                    .find(|c| !is_field_char(c))
                    .unwrap_or(self.rest().len());
                let field = self.rest()[..len].to_owned();
                self.pos += len;
                Ok(field)
            }
            Some(c) => Err(self.error(
                self.pos,
                format!("expected a field name or a quoted string, found {c:?}"),
            )),
            None => Err(self.error(self.pos, "expected a field name, found the end")),
        }
    }

    /// value := quoted | bare, bare running to the next `,` or white space.
    fn value(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some(q) if is_quote(q) => self.quoted(),
            Some(c) if !matches!(c, ',' | '.' | '=' | '!' | '~') => {
                let len = self
                    .rest()
                    .find(|c: char| c == ',' || c.is_whitespace() || c.is_control())
                    .unwrap_or(self.rest().len());
                let value = self.rest()[..len].to_owned();
                self.pos += len;
                Ok(value)
            }
            Some(c) => Err(self.error(
                self.pos,
                format!("expected a value or a quoted string, found {c:?}"),
            )),
            None => Err(self.error(self.pos, "expected a value, found the end")),
        }
    }

    /// A string in `"`, `/` or `|` quotes with Go's escapes; the position is at the quote.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let (value, len) =
            unquote(self.rest()).map_err(|(at, reason)| self.error(self.pos + at, reason))?;
        self.pos += len;
        Ok(value)
    }
}

/// The quoted string at the start of `s` (which starts with the quote) and the bytes it
/// spans, or where (in `s`) and why it is wrong.
fn unquote(s: &str) -> Result<(String, usize), (usize, String)> {
    let mut chars = s.char_indices();
    let Some((_, quote)) = chars.next() else {
        return Err((0, "expected a quote".into()));
    };
    let unterminated = || (0, format!("{quote} quote is never closed"));
    // Escapes may make bytes (`\xff`) that only form UTF-8 together; checked at the end.
    let mut out = Vec::new();
    loop {
        let (i, c) = chars.next().ok_or_else(unterminated)?;
        if c == quote {
            let value =
                String::from_utf8(out).map_err(|_| (0, "quoted string is not UTF-8".into()))?;
            return Ok((value, i + c.len_utf8()));
        }
        match c {
            '\n' => return Err(unterminated()),
            '\\' => {
                let (_, e) = chars.next().ok_or_else(unterminated)?;
                let mut digits = |n: usize, radix: u32| -> Result<u32, (usize, String)> {
                    (0..n).try_fold(0, |v, _| {
                        let d = chars.next().and_then(|(_, d)| d.to_digit(radix));
                        d.map(|d| v * radix + d)
                            .ok_or_else(|| (i, format!("\\{e} escape is short of digits")))
                    })
                };
                match e {
                    'a' => out.push(0x07),
                    'b' => out.push(0x08),
                    'f' => out.push(0x0c),
                    'n' => out.push(b'\n'),
                    'r' => out.push(b'\r'),
                    't' => out.push(b'\t'),
                    'v' => out.push(0x0b),
                    '\\' => out.push(b'\\'),
                    '"' | '/' | '|' if e == quote => out.push(e as u8),
                    '0'..='7' => {
                        let v = e.to_digit(8).expect("octal digit") * 64 + digits(2, 8)?;
                        let byte = u8::try_from(v)
                            .map_err(|_| (i, "octal escape is more than \\377".to_owned()))?;
                        out.push(byte);
                    }
                    'x' => {
                        let v = digits(2, 16)?;
                        out.push(u8::try_from(v).expect("two hex digits"));
                    }
                    'u' | 'U' => {
                        let v = digits(if e == 'u' { 4 } else { 8 }, 16)?;
                        let c = char::from_u32(v).ok_or_else(|| {
                            (i, format!("\\{e} escape is not a Unicode scalar value"))
                        })?;
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    _ => return Err((i, format!("unknown escape \\{e}"))),
                }
            }
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Kind, Labels};
    use std::time::SystemTime;

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
        }
    }

    fn sample() -> Vec<Info> {
        vec![
            info(
                "default/1/sha256:aaa",
                None,
                Kind::Committed,
                &[("containerd.io/snapshot.ref", "sha256:aaa"), ("gc", "")],
            ),
            info(
                "default/2/extract 1",
                Some("default/1/sha256:aaa"),
                Kind::Active,
                &[("a.b/c", "x y")],
            ),
            info(
                "default/3/ro",
                Some("default/1/sha256:aaa"),
                Kind::View,
                &[],
            ),
        ]
    }

    /// Names of the sample snapshots that `filters` lets through.
    fn names(filters: &[&str]) -> Vec<String> {
        let f = Filters::parse(filters).unwrap();
        sample()
            .into_iter()
            .filter(|i| f.matches(i))
            .map(|i| i.name)
            .collect()
    }

    #[test]
    fn no_filter_or_an_empty_one_matches_everything() {
        assert_eq!(names(&[]).len(), 3);
        assert_eq!(names(&[""]).len(), 3);
    }

    #[test]
    fn kind_name_and_parent() {
        assert_eq!(names(&["kind==committed"]), ["default/1/sha256:aaa"]);
        assert_eq!(names(&["kind!=committed"]).len(), 2);
        assert_eq!(
            names(&["name==\"default/2/extract 1\""]),
            ["default/2/extract 1"]
        );
        assert_eq!(names(&["parent"]).len(), 2, "bare parent: has one");
        assert_eq!(
            names(&["parent==default/1/sha256:aaa"]),
            ["default/2/extract 1", "default/3/ro"]
        );
        assert_eq!(
            names(&["parent!=default/1/sha256:aaa"]),
            ["default/1/sha256:aaa"]
        );
        assert!(names(&["unknown"]).is_empty());
        assert!(names(&["unknown==x"]).is_empty());
        assert_eq!(names(&["unknown!=x"]).len(), 3);
    }

    #[test]
    fn labels_with_bare_dotted_and_quoted_keys() {
        let committed = ["default/1/sha256:aaa"];
        assert_eq!(
            names(&[r#"labels."containerd.io/snapshot.ref"==sha256:aaa"#]),
            committed
        );
        assert_eq!(
            names(&[r#"labels."a.b/c"=="x y""#]),
            ["default/2/extract 1"]
        );
        assert_eq!(
            names(&["labels.gc"]),
            committed,
            "present with an empty value"
        );
        assert!(names(&["labels.gc==x"]).is_empty());
        assert_eq!(
            names(&["labels.missing!=x"]).len(),
            3,
            "!= matches a missing label"
        );
        assert!(names(&["labels.missing"]).is_empty());
        assert!(
            names(&["labels.missing==\"\""]).is_empty(),
            "== needs it present"
        );
    }

    #[test]
    fn commas_and_selectors_and_strings_or() {
        assert_eq!(names(&["kind==active,parent"]), ["default/2/extract 1"]);
        assert!(names(&["kind==active , kind==view"]).is_empty());
        assert_eq!(names(&["kind==active", "kind==view"]).len(), 2);
        assert_eq!(
            names(&[" kind == view ", "name==nothing"]),
            ["default/3/ro"]
        );
    }

    #[test]
    fn regular_expressions_and_escapes() {
        assert_eq!(names(&["name~=extract"]), ["default/2/extract 1"]);
        assert_eq!(names(&["name~=^default/[13]/"]).len(), 2);
        assert_eq!(names(&[r"name~=/sha256:a{3}$/"]), ["default/1/sha256:aaa"]);
        assert_eq!(names(&[r#"name~="\\d/ro$""#]), ["default/3/ro"]);
        assert_eq!(names(&["labels.missing~=^$"]).len(), 3, "missing is empty");
        assert_eq!(names(&[r#"name=="default/3/\x72\157""#]), ["default/3/ro"]);
        assert_eq!(names(&[r#"name=="default/3/\u0072o""#]), ["default/3/ro"]);
        assert_eq!(names(&[r"name==|default/3/ro|"]), ["default/3/ro"]);
    }

    #[test]
    fn syntax_errors_name_the_filter_and_where() {
        for (bad, at) in [
            ("kind=committed", 4),
            ("kind===committed", 4),
            ("kind==", 6),
            ("kind==,name", 6),
            ("kind committed", 5),
            (",kind", 0),
            ("kind,", 5),
            ("labels.", 7),
            ("labels.\"unterminated", 7),
            ("name==\"bad \\q escape\"", 11),
            ("name==\"\\xff\"", 6),
            ("name~=(", 6),
            ("name==a b", 8),
            ("labels.containerd.io/snapshot.ref==x", 20),
            ("name==\"\\u00\"", 7),
            ("name==\"\\400\"", 7),
            ("name==\"\\ud800\"", 7),
            ("name==\"a\\/\"", 8),
        ] {
            let err = Filters::parse(&["kind==view", bad]).unwrap_err();
            assert_eq!(err.filter, bad);
            assert_eq!(err.at, at, "{bad}: {}", err.reason);
            let status = Error::from(err);
            assert_eq!(status.code, Code::InvalidArgument);
            assert!(
                status.message.contains(&format!("{bad:?}")),
                "{}",
                status.message
            );
        }
    }
}
