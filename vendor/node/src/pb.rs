//! The few protobuf primitives the Codex formats need, written by hand because the
//! reference writes fields that proto3 encoders skip (zero values) and the bytes must match.

/// Wire type of varint fields.
pub(crate) const VARINT: u8 = 0;
/// Wire type of length-delimited fields.
pub(crate) const LEN: u8 = 2;

/// Why a protobuf message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid protobuf: {0}")]
pub struct DecodeError(pub(crate) &'static str);

/// Appends `v` as an unsigned LEB128 varint.
pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Appends a varint field, written even when zero.
pub(crate) fn put_uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(buf, u64::from(field) << 3 | u64::from(VARINT));
    put_varint(buf, v);
}

/// Appends a length-delimited field.
pub(crate) fn put_bytes(buf: &mut Vec<u8>, field: u32, v: &[u8]) {
    put_varint(buf, u64::from(field) << 3 | u64::from(LEN));
    put_varint(buf, v.len() as u64);
    buf.extend_from_slice(v);
}

/// Reads a varint from the front of `buf`, advancing it.
pub(crate) fn get_varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or(DecodeError("truncated varint"))?;
        *buf = rest;
        if i == 9 && b > 1 {
            return Err(DecodeError("varint overflows 64 bits"));
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError("varint too long"))
}

/// One decoded field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    /// A varint field.
    Uint(u64),
    /// A length-delimited field.
    Bytes(&'a [u8]),
}

impl<'a> Value<'a> {
    /// The varint, or an error naming `what`.
    pub(crate) fn uint(self, what: &'static str) -> Result<u64, DecodeError> {
        match self {
            Value::Uint(v) => Ok(v),
            Value::Bytes(_) => Err(DecodeError(what)),
        }
    }

    /// The bytes, or an error naming `what`.
    pub(crate) fn bytes(self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        match self {
            Value::Bytes(b) => Ok(b),
            Value::Uint(_) => Err(DecodeError(what)),
        }
    }
}

/// Iterates over the fields of a message, skipping 32- and 64-bit fixed fields.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    /// Fields of the encoded message `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, DecodeError> {
        loop {
            if self.buf.is_empty() {
                return Ok(None);
            }
            let key = get_varint(&mut self.buf)?;
            let field = u32::try_from(key >> 3).map_err(|_| DecodeError("field number"))?;
            if field == 0 {
                return Err(DecodeError("field number 0"));
            }
            match (key & 7) as u8 {
                VARINT => return Ok(Some((field, Value::Uint(get_varint(&mut self.buf)?)))),
                LEN => {
                    let len = get_varint(&mut self.buf)?;
                    let len = usize::try_from(len).map_err(|_| DecodeError("length"))?;
                    if len > self.buf.len() {
                        return Err(DecodeError("length exceeds message"));
                    }
                    let (v, rest) = self.buf.split_at(len);
                    self.buf = rest;
                    return Ok(Some((field, Value::Bytes(v))));
                }
                1 => self.skip(8)?,
                5 => self.skip(4)?,
                _ => return Err(DecodeError("unsupported wire type")),
            }
        }
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError("truncated fixed field"));
        }
        self.buf = &self.buf[n..];
        Ok(())
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_field() {
            Ok(Some(f)) => Some(Ok(f)),
            Ok(None) => None,
            Err(e) => {
                self.buf = &[];
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, 0xCD01, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut s = b.as_slice();
            assert_eq!(get_varint(&mut s).unwrap(), v);
            assert!(s.is_empty());
        }
        let mut b = Vec::new();
        put_varint(&mut b, 0xCD01);
        assert_eq!(b, [0x81, 0x9a, 0x03]);
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        for bad in [
            &[0x80u8][..],
            &[0x0a, 0x05, 1],
            &[0x00, 0x01],
            &[0x0b],
            &[0xff; 11],
        ] {
            assert!(Fields::new(bad).any(|f| f.is_err()), "{bad:?}");
        }
    }
}
