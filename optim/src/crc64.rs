//! CRC-64/XZ (ECMA-182 polynomial, reflected), the checksum of checkpoints.
//!
//! A CRC detects every error of one to three flipped bits and every burst of
//! up to 64 bits, which a general hash only does with high probability.
//! Slicing by 8: eight 256-entry tables, computed at compile time.

/// The reflected ECMA-182 polynomial.
const POLY: u64 = 0xC96C_5795_D787_0F42;

const fn tables() -> [[u64; 256]; 8] {
    let mut t = [[0u64; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

static TABLES: [[u64; 256]; 8] = tables();

/// An incremental CRC-64/XZ.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Crc64(u64);

impl Crc64 {
    pub(crate) fn new() -> Self {
        Crc64(u64::MAX)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        let t = &TABLES;
        let mut crc = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            crc ^= u64::from_le_bytes(w);
            crc = t[7][(crc & 0xff) as usize]
                ^ t[6][((crc >> 8) & 0xff) as usize]
                ^ t[5][((crc >> 16) & 0xff) as usize]
                ^ t[4][((crc >> 24) & 0xff) as usize]
                ^ t[3][((crc >> 32) & 0xff) as usize]
                ^ t[2][((crc >> 40) & 0xff) as usize]
                ^ t[1][((crc >> 48) & 0xff) as usize]
                ^ t[0][(crc >> 56) as usize];
        }
        for &b in chunks.remainder() {
            crc = t[0][((crc ^ b as u64) & 0xff) as usize] ^ (crc >> 8);
        }
        self.0 = crc;
    }

    /// Feeds a length-prefixed field (so that field boundaries count).
    pub(crate) fn field(&mut self, bytes: &[u8]) {
        self.update(&(bytes.len() as u64).to_le_bytes());
        self.update(bytes);
    }

    pub(crate) fn finish(self) -> u64 {
        self.0 ^ u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc(b: &[u8]) -> u64 {
        let mut c = Crc64::new();
        c.update(b);
        c.finish()
    }

    /// The catalogued check value of CRC-64/XZ, and a bit-by-bit CRC.
    #[test]
    fn matches_the_catalogue_and_a_bitwise_crc() {
        assert_eq!(crc(b"123456789"), 0x995D_C9BB_DF19_39FA);
        let bitwise = |b: &[u8]| {
            let mut c = u64::MAX;
            for &x in b {
                c ^= x as u64;
                for _ in 0..8 {
                    c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
                }
            }
            c ^ u64::MAX
        };
        let data: Vec<u8> = (0..1000u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 999, 1000] {
            assert_eq!(crc(&data[..len]), bitwise(&data[..len]), "len {len}");
            // Incremental in uneven pieces.
            let mut c = Crc64::new();
            let (a, b) = data[..len].split_at(len / 3);
            c.update(a);
            c.update(b);
            assert_eq!(c.finish(), bitwise(&data[..len]));
        }
    }
}
