//! The byte encoding of the messages between ranks: little-endian integers
//! and values, read back with every length checked (a malformed message is
//! an error, never a panic).

use lazyadam_kernels::{DType, bf16, f16};

use crate::error::Error;
use crate::tensor::TensorRef;

/// Appends to a message.
#[derive(Debug, Default)]
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    pub fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// A storage type tag.
    pub fn dtype(&mut self, d: DType) {
        self.u8(match d {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        });
    }
    /// Values `range` of `t` in their storage type (no tag).
    pub fn values(&mut self, t: &TensorRef<'_>, range: std::ops::Range<usize>) {
        // Little-endian targets: the values' own bytes, copied at once.
        #[cfg(target_endian = "little")]
        match t {
            TensorRef::F32(s) => self.0.extend_from_slice(bytemuck::cast_slice(&s[range])),
            TensorRef::F16(s) => self.0.extend_from_slice(bytemuck::cast_slice(&s[range])),
            TensorRef::BF16(s) => self.0.extend_from_slice(bytemuck::cast_slice(&s[range])),
        }
        #[cfg(not(target_endian = "little"))]
        match t {
            TensorRef::F32(s) => s[range]
                .iter()
                .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes())),
            TensorRef::F16(s) => s[range]
                .iter()
                .for_each(|x| self.0.extend_from_slice(&x.to_bits().to_le_bytes())),
            TensorRef::BF16(s) => s[range]
                .iter()
                .for_each(|x| self.0.extend_from_slice(&x.to_bits().to_le_bytes())),
        }
    }
}

/// Reads a message from rank `from`.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    from: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], from: usize) -> Self {
        Reader { buf, pos: 0, from }
    }

    /// The error for a malformed message.
    pub fn malformed(&self, what: &str) -> Error {
        Error::Sharding {
            reason: format!(
                "malformed message from rank {} ({what} at byte {} of {})",
                self.from,
                self.pos,
                self.buf.len()
            ),
        }
    }

    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.malformed(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, Error> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A count of items of `item_bytes` bytes each that must fit in the rest
    /// of the message (so that a crafted count cannot make us allocate).
    pub fn count(&mut self, item_bytes: usize, what: &str) -> Result<usize, Error> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.checked_mul(item_bytes.max(1) as u64)
            .is_none_or(|b| b > left)
        {
            return Err(self.malformed(what));
        }
        Ok(n as usize)
    }

    pub fn dtype(&mut self, what: &str) -> Result<DType, Error> {
        match self.u8(what)? {
            0 => Ok(DType::F32),
            1 => Ok(DType::F16),
            2 => Ok(DType::BF16),
            _ => Err(self.malformed(what)),
        }
    }

    /// `n` values of storage type `d`, appended to `out` as f32 (exact).
    pub fn values_f32(
        &mut self,
        d: DType,
        n: usize,
        out: &mut Vec<f32>,
        what: &str,
    ) -> Result<(), Error> {
        let width = d.size_bytes();
        let bytes = n.checked_mul(width).ok_or_else(|| self.malformed(what))?;
        let b = self.take(bytes, what)?;
        // `n` values are in the message: one growth at most.
        out.reserve(n);
        match d {
            DType::F32 => out.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                b.chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            ),
            DType::BF16 => out.extend(
                b.chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            ),
        }
        Ok(())
    }

    /// Whether the whole message was read.
    pub fn finish(&self) -> Result<(), Error> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }
}
