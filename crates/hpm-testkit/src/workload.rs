//! Deterministic test data that makes misplaced blocks visible.
//!
//! This module owns the byte patterns tests write. A pattern is a pure function of its seed and
//! of each byte's position, so any slice of it can be regenerated without keeping it, two seeds
//! differ in practically every 8-byte word, and no byte is zero, so a block that reads as
//! zeros, a block from another write, or a block shifted by a few bytes never passes for the
//! one expected.

/// SplitMix64's finaliser: a bijective, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The byte at `pos` of the pattern of `seed`; never zero.
fn byte_at(seed: u64, pos: u64) -> u8 {
    let word = mix(mix(seed) ^ (pos / 8));
    match word.to_le_bytes()[(pos % 8) as usize] {
        // Zero bytes are remapped so that no pattern byte is ever zero.
        0 => 0xA5,
        b => b,
    }
}

/// Fills `buf` with bytes `[offset, offset + buf.len())` of the pattern of `seed`.
pub fn fill_at(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(seed, offset + i as u64);
    }
}

/// Bytes `[offset, offset + len)` of the pattern of `seed`.
pub fn pattern_at(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill_at(seed, offset, &mut v);
    v
}

/// The first `len` bytes of the pattern of `seed`: distinct per seed, without zero bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    pattern_at(seed, 0, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sliceable() {
        let whole = pattern(42, 10_000);
        assert_eq!(whole, pattern(42, 10_000));
        assert_eq!(pattern_at(42, 4093, 100), whole[4093..4193]);
        assert_eq!(pattern(42, 17), whole[..17]);
    }

    #[test]
    fn no_zero_bytes_and_seeds_differ_everywhere() {
        let seeds: Vec<Vec<u8>> = (0..64).map(|s| pattern(s, 4096)).collect();
        for (i, a) in seeds.iter().enumerate() {
            assert!(a.iter().all(|&b| b != 0), "seed {i} has a zero byte");
            for b in &seeds[i + 1..] {
                let same_words = a.chunks(8).zip(b.chunks(8)).filter(|(x, y)| x == y).count();
                assert_eq!(same_words, 0);
            }
        }
    }

    #[test]
    fn shifted_blocks_differ() {
        let p = pattern(7, 8192);
        assert_ne!(p[..4096], p[4096..]);
        assert_ne!(p[..4096], p[1..4097]);
        // Bytes are spread over the whole range, not a few values.
        let mut seen = [false; 256];
        for &b in &p {
            seen[b as usize] = true;
        }
        assert!(seen.iter().filter(|&&s| s).count() > 200);
    }
}
