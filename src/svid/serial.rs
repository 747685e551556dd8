//! Certificate serial numbers: what RFC 5280 §4.1.2.2 allows any issuer to use, and the ones
//! Mayfly draws for its own certificates.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use super::SvidError;

/// The longest serial accepted, in octets of DER INTEGER content (RFC 5280 §4.1.2.2: "Conforming
/// CAs MUST NOT use serialNumber values longer than 20 octets"; what pyca's
/// `random_serial_number()` makes, a positive 159-bit integer, fits).
pub const MAX_SERIAL_LEN: usize = 20;

/// The length of the serials Mayfly draws for its own certificates, in octets.
pub const GENERATED_SERIAL_LEN: usize = 16;

/// A certificate serial number: a positive integer, held as the content octets of its minimal
/// DER INTEGER encoding (1 to [`MAX_SERIAL_LEN`] octets; a leading zero octet only where the
/// next one has its top bit set). Valid by construction: every constructor checks that, so a
/// `Serial` always names a serial a conforming certificate can carry.
///
/// Serials from other issuers are taken as they are. The ones Mayfly draws
/// ([`Serial::generate`]) are 16 octets: the first 8 are the issuance time in microseconds since
/// the Unix epoch (with bit 62 set, so the first octet is never zero and the encoding is always
/// exactly 16 octets), the last 8 come from the system's CSPRNG. The random half gives the 64
/// unpredictable bits that keep a CA's signature input unguessable (the CA/Browser Forum's rule
/// for serials), and makes two serials drawn in the same microsecond differ; the time half makes
/// serials, and their hex strings, sort in issuance order. That order matters to the store: the
/// audit log keeps every serial in a unique index, and a random key lands each new record on a
/// random page of that index, which the write-ahead log then writes whole — time-ordered keys
/// append to the same last page instead.
///
/// Serials order as the integers they are (a shorter minimal encoding is a smaller number).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial {
    /// How many octets of `octets` are the encoding; compared first, which orders by value.
    len: u8,
    /// The encoding, then zeros.
    octets: [u8; MAX_SERIAL_LEN],
}

/// Set in the time half of every generated serial, so its first byte is never zero (the time
/// in microseconds stays below 2^62 for another 140,000 years).
const SERIAL_TIME_MARK: u64 = 1 << 62;

impl Serial {
    /// Draws a fresh serial for a certificate issued now (see [`Serial`] for the layout).
    ///
    /// # Panics
    /// Only if the operating system's random number generator fails, which aws-lc treats as
    /// fatal anyway; [`Serial::try_generate`] reports it instead.
    pub fn generate() -> Self {
        Self::try_generate().expect("the system random number generator failed")
    }

    /// Like [`Serial::generate`], reporting a failing random number generator.
    ///
    /// # Errors
    /// [`SvidError::Random`] when the random number generator fails.
    pub fn try_generate() -> Result<Self, SvidError> {
        Self::try_generate_at(SystemTime::now())
    }

    /// A fresh serial for a certificate issued at `now`.
    pub(super) fn try_generate_at(now: SystemTime) -> Result<Self, SvidError> {
        let micros = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let time = (micros & (SERIAL_TIME_MARK - 1)) | SERIAL_TIME_MARK;
        let mut octets = [0u8; MAX_SERIAL_LEN];
        octets[..8].copy_from_slice(&time.to_be_bytes());
        aws_lc_rs::rand::fill(&mut octets[8..GENERATED_SERIAL_LEN])
            .map_err(|_| SvidError::Random)?;
        Ok(Self {
            len: GENERATED_SERIAL_LEN as u8,
            octets,
        })
    }

    /// Takes the content octets of a DER INTEGER serial, as a certificate carries it
    /// (x509-parser's `raw_serial`). `None` unless they are the minimal encoding of a positive
    /// integer in at most [`MAX_SERIAL_LEN`] octets: empty, zero, negative, padded with a
    /// needless leading zero, or longer are all refused.
    pub fn from_der_integer(content: &[u8]) -> Option<Self> {
        let (&first, rest) = content.split_first()?;
        if content.len() > MAX_SERIAL_LEN || first & 0x80 != 0 {
            return None;
        }
        if first == 0 {
            // A leading zero is only there to keep the next octet's top bit from reading as a
            // sign; zero itself is no positive integer.
            match rest.first() {
                Some(&next) if next & 0x80 != 0 => {}
                _ => return None,
            }
        }
        let mut octets = [0u8; MAX_SERIAL_LEN];
        octets[..content.len()].copy_from_slice(content);
        Some(Self {
            len: u8::try_from(content.len()).ok()?,
            octets,
        })
    }

    /// Parses the hex form [`Serial::to_hex`] writes (either case); `None` for anything that is
    /// not the hex of a valid serial (see [`Serial::from_der_integer`]).
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() > 2 * MAX_SERIAL_LEN {
            return None;
        }
        Self::from_der_integer(&hex::decode(text).ok()?)
    }

    /// The content octets of the serial's DER INTEGER, as a certificate carries them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.octets[..usize::from(self.len)]
    }

    /// The serial as lowercase hex of its DER content octets (32 digits for Mayfly's own).
    pub fn to_hex(&self) -> String {
        hex::encode(self.as_bytes())
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// Serialized as [`Serial::to_hex`], the form the audit log and the APIs show.
impl serde::Serialize for Serial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl std::str::FromStr for Serial {
    type Err = SvidError;

    /// [`Serial::from_hex`], with an error to report.
    fn from_str(text: &str) -> Result<Self, SvidError> {
        Self::from_hex(text).ok_or(SvidError::UnsupportedSerial)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn generated_serials_are_positive_16_octets_and_hex_round_trips() {
        for _ in 0..1000 {
            let s = Serial::generate();
            let bytes = s.as_bytes();
            assert_eq!(bytes.len(), 16);
            assert!(bytes[0] != 0 && bytes[0] & 0x80 == 0);
            let hex = s.to_hex();
            assert_eq!(hex.len(), 32);
            assert_eq!(hex, s.to_string());
            assert_eq!(hex, hex.to_lowercase());
            assert_eq!(Serial::from_hex(&hex), Some(s));
            assert_eq!(Serial::from_hex(&hex.to_uppercase()), Some(s));
            assert_eq!(hex.parse::<Serial>(), Ok(s));
        }
        assert_eq!(Serial::from_hex(""), None);
        assert_eq!(Serial::from_hex("zz"), None);
        assert_eq!(Serial::from_hex("abc"), None);
        assert_eq!(Serial::from_hex(&"0".repeat(30)), None);
        assert_eq!(Serial::from_hex(&"g".repeat(32)), None);
        assert_eq!("".parse::<Serial>(), Err(SvidError::UnsupportedSerial));
    }

    #[test]
    fn serials_sort_by_issuance_time_and_carry_64_random_bits() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = Serial::try_generate_at(t0).unwrap();
        let b = Serial::try_generate_at(t0).unwrap();
        let later = Serial::try_generate_at(t0 + Duration::from_micros(1)).unwrap();
        // Same microsecond: the time halves agree, the random halves differ.
        assert_eq!(a.as_bytes()[..8], b.as_bytes()[..8]);
        assert_ne!(a.as_bytes()[8..], b.as_bytes()[8..]);
        // A microsecond later sorts after both, as serials and as hex.
        assert!(later > a && later > b);
        assert!(later.to_hex() > a.to_hex() && later.to_hex() > b.to_hex());
        // The time half reads back as the issuance time.
        let time = u64::from_be_bytes(a.as_bytes()[..8].try_into().unwrap());
        assert_eq!(time & !SERIAL_TIME_MARK, 1_800_000_000_000_000);
        // Before the epoch (a broken clock) still gives a positive 16-octet serial.
        let early = Serial::try_generate_at(UNIX_EPOCH - Duration::from_secs(1)).unwrap();
        assert_eq!(early.as_bytes()[0], 0x40);
        assert_eq!(early.as_bytes().len(), 16);
    }

    #[test]
    fn serials_of_other_issuers_up_to_20_octets() {
        // The smallest, a short one, and pyca's random_serial_number(): 159 bits, 20 octets.
        assert_eq!(Serial::from_der_integer(&[1]).unwrap().as_bytes(), [1]);
        assert_eq!(Serial::from_der_integer(&[1]).unwrap().to_hex(), "01");
        let pyca = [0x7f; 20];
        assert_eq!(Serial::from_der_integer(&pyca).unwrap().as_bytes(), pyca);
        // A leading zero where the next octet's top bit needs it: 160 bits of value, 21 octets
        // of content, over the limit; with 19 octets of value it fits.
        let mut signed = vec![0u8];
        signed.extend([0xff; 20]);
        assert_eq!(Serial::from_der_integer(&signed), None);
        let mut fits = vec![0u8];
        fits.extend([0xff; 19]);
        assert_eq!(Serial::from_der_integer(&fits).unwrap().as_bytes(), fits);
        assert_eq!(
            Serial::from_hex(&hex::encode(&fits)).unwrap().as_bytes(),
            fits
        );
        // Refused: 21 octets, negative, zero, padded, empty.
        assert_eq!(Serial::from_der_integer(&[1; 21]), None);
        assert_eq!(Serial::from_der_integer(&[0x80]), None);
        assert_eq!(Serial::from_der_integer(&[0]), None);
        assert_eq!(Serial::from_der_integer(&[0, 1]), None);
        assert_eq!(Serial::from_der_integer(&[]), None);
        assert_eq!(Serial::from_hex(&"01".repeat(21)), None);
        // Ordered by value, whatever the length.
        let small = Serial::from_der_integer(&[0x7f]).unwrap();
        let bigger = Serial::from_der_integer(&[0x00, 0x80]).unwrap();
        let biggest = Serial::from_der_integer(&[0x01, 0x00]).unwrap();
        assert!(small < bigger && bigger < biggest);
    }
}
