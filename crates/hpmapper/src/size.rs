//! Byte sizes as people write and read them: parsing `SIZE` arguments ("64M", "4096",
//! "1GiB") and formatting figures for human output ("512 KiB", "1.5 GiB").
//!
//! Every unit is binary (1K = 1024). Decimal-looking units ("MB") are refused rather than
//! guessed, so a typo never silently changes a size by 5%.

use std::fmt;

const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// Why a size did not parse; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError {
    input: String,
    why: String,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid size {:?}: {}; write plain bytes or a whole number with a K, M, G or T \
             suffix (binary: 1K = 1024)",
            self.input, self.why
        )
    }
}

impl std::error::Error for SizeError {}

/// Parses a byte size: plain bytes, or a whole number followed by `K`, `M`, `G` or `T`
/// (also `KiB`, `MiB`, ..., any case, optionally a space between), or `B` for bytes.
pub fn parse(input: &str) -> Result<u64, SizeError> {
    let err = |why: String| SizeError {
        input: input.to_string(),
        why,
    };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(err(if s.is_empty() {
            "it is empty".into()
        } else {
            "it does not start with a number".into()
        }));
    }
    let unit = unit.trim_start();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            return Err(err(format!(
                "unit {unit:?} is ambiguous (decimal or binary?); use {} or {}iB",
                &unit[..1].to_ascii_uppercase(),
                &unit[..1].to_ascii_uppercase()
            )))
        }
        _ if unit.starts_with('.') => return Err(err("fractions are not supported".into())),
        _ => return Err(err(format!("unknown unit {unit:?}"))),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| err("the number is too large".into()))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| err("it does not fit in 64 bits".into()))
}

/// Parses a size as Docker's storage options are read (go-units `RAMInBytes`, which
/// devicemapper's `dm.basesize` and every driver's `--storage-opt size=` use): a number,
/// fractions allowed, then optionally a space and a unit `k`, `m`, `g`, `t` or `p` in any
/// case, itself optionally followed by `i` and then `b`; every unit is binary, so "20GB",
/// "20g", "20GiB" and "1.5G" all parse (the fraction of a byte is dropped). Docker users
/// write these; refusing "GB" here would only break their commands.
pub fn parse_docker(input: &str) -> Result<u64, SizeError> {
    let err = |why: &str| SizeError {
        input: input.to_string(),
        why: why.to_string(),
    };
    let s = input.trim();
    let number_end = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, rest) = s.split_at(number_end);
    if !number.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(err(if s.is_empty() {
            "it is empty"
        } else {
            "it does not start with a number"
        }));
    }
    let n: f64 = number.parse().map_err(|_| err("the number is malformed"))?;
    let mut unit = rest.strip_prefix(' ').unwrap_or(rest).chars().peekable();
    let shift = match unit.peek().map(char::to_ascii_lowercase) {
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('p') => 50,
        _ => 0,
    };
    if shift > 0 {
        unit.next();
    }
    unit.next_if(|c| c.eq_ignore_ascii_case(&'i'));
    unit.next_if(|c| c.eq_ignore_ascii_case(&'b'));
    if unit.next().is_some() {
        return Err(err("unknown unit"));
    }
    let bytes = n * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(err("it does not fit in 64 bits"));
    }
    Ok(bytes as u64)
}

/// Parses a whole percentage below 100: `"10%"` or `"10"` (as devicemapper's
/// `dm.min_free_space=10%`). The error says what is accepted.
pub fn parse_percent(input: &str) -> Result<u8, String> {
    let s = input.trim();
    let digits = s.strip_suffix('%').unwrap_or(s).trim_end();
    match digits.parse::<u8>() {
        Ok(n) if n < 100 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!(
            "invalid percentage {input:?}: write a whole number from 0 to 99, optionally followed by %"
        )),
    }
}

/// Formats a byte count for people: "0 B", "512 KiB", "1.5 MiB".
pub fn human(bytes: u64) -> String {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let base = 1u64 << (10 * unit);
    if bytes.is_multiple_of(base) {
        format!("{} {}", bytes / base, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / base as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_sizes_parse_as_docker_reads_them() {
        let table: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("512b", 512),
            ("20G", 20 << 30),
            ("20g", 20 << 30),
            ("20GB", 20 << 30),
            ("20gb", 20 << 30),
            ("20GiB", 20 << 30),
            ("20 GB", 20 << 30),
            ("1.5G", 3 << 29),
            ("512M", 512 << 20),
            ("100k", 100 << 10),
            ("1T", 1 << 40),
            ("2P", 2 << 50),
            ("0.5k", 512),
            ("1.0001k", 1024),
        ];
        for &(input, want) in table {
            assert_eq!(parse_docker(input), Ok(want), "{input}");
        }
        for bad in [
            "",
            "G",
            "-1G",
            "1.2.3G",
            "20GX",
            "20 G B",
            "20x",
            "20000000P",
            ".5G",
        ] {
            let e = parse_docker(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn plain_bytes_and_binary_suffixes_parse() {
        let table: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("1K", 1024),
            ("1k", 1024),
            ("512K", 512 << 10),
            ("512KiB", 512 << 10),
            ("512kib", 512 << 10),
            ("64M", 64 << 20),
            ("64 MiB", 64 << 20),
            ("64m", 64 << 20),
            ("2G", 2 << 30),
            ("2GiB", 2 << 30),
            ("3T", 3 << 40),
            ("3tib", 3 << 40),
            (" 8M ", 8 << 20),
            ("16777215T", 16_777_215 << 40),
        ];
        for &(input, want) in table {
            assert_eq!(parse(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn percentages_parse_below_100_and_garbage_is_refused() {
        for (input, want) in [("0", 0), ("10%", 10), (" 25 % ", 25), ("99", 99), ("5%", 5)] {
            assert_eq!(parse_percent(input), Ok(want), "{input:?}");
        }
        for input in [
            "", "%", "100", "100%", "-1", "+5", "1.5%", "ten", "10%%", "256",
        ] {
            let e = parse_percent(input).expect_err(input);
            assert!(e.contains("from 0 to 99"), "{input:?}: {e}");
        }
    }

    #[test]
    fn garbage_is_refused_with_a_clear_message() {
        let table: &[(&str, &str)] = &[
            ("", "it is empty"),
            ("   ", "it is empty"),
            ("12Q", "unknown unit \"Q\""),
            ("M", "does not start with a number"),
            ("-1", "does not start with a number"),
            ("1.5G", "fractions are not supported"),
            ("64MB", "ambiguous"),
            ("1 GB", "ambiguous"),
            ("10KiBs", "unknown unit"),
            ("1e6", "unknown unit"),
            ("0x100", "unknown unit"),
            ("99999999999999999999", "too large"),
            ("16777216T", "does not fit in 64 bits"),
        ];
        for &(input, why) in table {
            let e = parse(input).expect_err(input).to_string();
            assert!(e.contains(why), "{input:?}: {e}");
            assert!(e.contains("K, M, G or T"), "{input:?}: {e}");
            assert!(!e.contains('\n'), "{input:?}: {e}");
        }
    }

    #[test]
    fn human_sizes_read_well() {
        let table: &[(u64, &str)] = &[
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1 KiB"),
            (512 << 10, "512 KiB"),
            (1536 << 10, "1.5 MiB"),
            (64 << 20, "64 MiB"),
            ((1 << 30) + 1, "1.0 GiB"),
            (5 << 40, "5 TiB"),
            (5000 << 40, "5000 TiB"),
            (u64::MAX, "16777216.0 TiB"),
        ];
        for &(n, want) in table {
            assert_eq!(human(n), want, "{n}");
        }
    }
}
