//! Sparseness of raw images: finding the runs of 4 KiB blocks that hold data, so import
//! writes only those and export seeks over the rest.
//!
//! Blocks are 4 KiB, the engine's unit of allocation: an all-zero block that is never
//! written costs no space in the pool, and one that is skipped in a file costs none there.

/// The engine's block size: its unit of allocation, and so the unit of zero detection.
pub const BLOCK: usize = 4096;

/// The byte ranges `[start, end)` of `buf` made of consecutive blocks that are not all
/// zeros. The last block may be short.
pub fn data_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(BLOCK).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let (start, end) = (i * BLOCK, i * BLOCK + block.len());
        match runs.last_mut() {
            Some((_, e)) if *e == start => *e = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(blocks: &[u8]) -> Vec<u8> {
        blocks
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, BLOCK))
            .collect()
    }

    #[test]
    fn zero_blocks_split_runs() {
        assert_eq!(data_runs(&[]), vec![]);
        assert_eq!(data_runs(&image(&[0, 0])), vec![]);
        assert_eq!(data_runs(&image(&[1, 2])), vec![(0, 2 * BLOCK)]);
        assert_eq!(
            data_runs(&image(&[0, 1, 1, 0, 0, 3])),
            vec![(BLOCK, 3 * BLOCK), (5 * BLOCK, 6 * BLOCK)]
        );
    }

    #[test]
    fn one_byte_makes_a_block_data_and_short_tails_count() {
        let mut buf = vec![0u8; 3 * BLOCK + 10];
        buf[BLOCK + 4095] = 7;
        buf[3 * BLOCK + 9] = 1;
        assert_eq!(
            data_runs(&buf),
            vec![(BLOCK, 2 * BLOCK), (3 * BLOCK, 3 * BLOCK + 10)]
        );
    }
}
