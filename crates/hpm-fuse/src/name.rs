//! Device name -> file name: flat, safe, and stable.
//!
//! Device names are opaque strings of 1 to 1024 bytes (containerd keys carry '/', spaces and
//! anything else but NUL); a file name in our directory must be one path component of at most
//! 255 bytes, and should be harmless in a shell and never hidden. The mapping:
//!
//! - Bytes `A-Z a-z 0-9 - _` are kept, and `.` except as the first byte. Every other byte
//!   (including '/', '%', a leading '.', and each byte of a multi-byte UTF-8 character) becomes
//!   `%XX` with two upper-case hex digits. So `.` and `..` never occur, no name is hidden, and
//!   the encoding can be decoded back.
//! - If the result is longer than 255 bytes, it is cut to its first 200 bytes (never inside a
//!   `%XX`) followed by `~` and 16 hex digits of a 64-bit hash of the whole device name. `~`
//!   never occurs in an encoding that was not cut, so a cut name cannot equal an uncut one.
//!   Two long names with the same prefix and the same hash would collide; the export refuses
//!   to add the second one (`EEXIST`) rather than mix them up, and keeps its own reverse map
//!   from file name to device name, so nothing depends on decoding.
//!
//! This module owns the mapping only; it must never depend on which devices exist.

use std::fmt::Write;

/// The longest file name Linux filesystems accept (`NAME_MAX`).
const NAME_MAX: usize = 255;
/// How much of an over-long encoding is kept before the hash.
const CUT_AT: usize = 200;

/// The file name under which device `device_name` appears in the export directory.
pub fn file_name(device_name: &str) -> String {
    let mut out = String::with_capacity(device_name.len());
    for (i, &b) in device_name.as_bytes().iter().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").expect("writing to a String");
        }
    }
    if out.len() <= NAME_MAX {
        return out;
    }
    let bytes = out.as_bytes();
    let mut cut = CUT_AT;
    // Back off so that no `%XX` is split: an escape starts at most 2 bytes before the cut.
    for back in 1..=2 {
        if bytes[cut - back] == b'%' {
            cut -= back;
            break;
        }
    }
    format!("{}~{:016x}", &out[..cut], hash64(device_name.as_bytes()))
}

/// Decodes a file name that was not cut back to its device name; `None` for a cut (hashed)
/// name or anything `file_name` cannot produce.
pub fn device_name(file_name: &str) -> Option<String> {
    if file_name.contains('~') {
        return None;
    }
    let b = file_name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let name = String::from_utf8(out).ok()?;
    (self::file_name(&name) == file_name).then_some(name)
}

/// FNV-1a over the bytes, then a 64-bit finalizer so that every input bit reaches every
/// output bit. Stable across versions and machines: file names derived from it may be stored
/// by callers.
fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_names_stay_as_they_are() {
        assert_eq!(file_name("base-ext4_v1.2"), "base-ext4_v1.2");
        assert_eq!(
            device_name("base-ext4_v1.2").as_deref(),
            Some("base-ext4_v1.2")
        );
    }

    #[test]
    fn unsafe_bytes_are_escaped() {
        assert_eq!(
            file_name("default/1/sha256:ab"),
            "default%2F1%2Fsha256%3Aab"
        );
        assert_eq!(file_name("."), "%2E");
        assert_eq!(file_name(".."), "%2E.");
        assert_eq!(file_name(".hidden"), "%2Ehidden");
        assert_eq!(file_name("50%"), "50%25");
        assert_eq!(file_name("a b"), "a%20b");
        assert_eq!(file_name("é"), "%C3%A9");
        for n in [
            "default/1/sha256:ab",
            ".",
            "..",
            ".hidden",
            "50%",
            "a b",
            "é",
            "x~y",
        ] {
            assert_eq!(device_name(&file_name(n)).as_deref(), Some(n), "{n}");
        }
    }

    #[test]
    fn every_file_name_is_one_safe_component() {
        let names = [
            "/".repeat(1024),
            "a".repeat(1024),
            "é".repeat(512),
            format!("{}/{}", "k".repeat(199), "z".repeat(300)),
            "%".repeat(300),
            "a".repeat(255),
            "a".repeat(256),
        ];
        for n in &names {
            let f = file_name(n);
            assert!(f.len() <= NAME_MAX, "{} bytes", f.len());
            assert!(!f.is_empty() && f != "." && f != ".." && !f.starts_with('.'));
            assert!(
                f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.%~".contains(&b)),
                "{f}"
            );
        }
        assert_eq!(file_name(&names[5]), names[5]);
        assert!(file_name(&names[6]).contains('~'));
    }

    #[test]
    fn cut_names_never_split_an_escape_and_differ_by_hash() {
        for pad in 0..4 {
            let n = format!("{}{}", "a".repeat(pad), "/".repeat(400));
            let f = file_name(&n);
            let (prefix, hash) = f.split_once('~').unwrap();
            assert_eq!(hash.len(), 16);
            assert!(
                device_name(prefix).is_some() || prefix.is_empty(),
                "{prefix}"
            );
        }
        let a = format!("{}a", "x".repeat(300));
        let b = format!("{}b", "x".repeat(300));
        assert_ne!(file_name(&a), file_name(&b));
        assert_eq!(device_name(&file_name(&a)), None);
    }

    #[test]
    fn the_hash_is_stable() {
        // File names may be recorded by callers: the mapping must not change between builds.
        assert_eq!(hash64(b""), 17_280_346_270_528_514_342);
        assert_eq!(
            file_name(&"q".repeat(300)),
            format!("{}~4e3702e1204ca571", "q".repeat(200))
        );
    }
}
