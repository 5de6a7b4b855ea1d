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
