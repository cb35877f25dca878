//! The codec that ships: AES-256-GCM (from `ring`) under a ring of keys.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::{CodecError, Encoded, PayloadCodec};

/// AES-256-GCM under a ring of keys: the first encodes new payloads, every one decodes what it
/// encoded. Each payload gets a random 96-bit nonce and is bound to its key id (as associated
/// data); its encoding is the nonce, the ciphertext and the 128-bit tag.
///
/// Rotating a key: put the new key first and keep the old ones while payloads they encoded are
/// still read (until the sagas that hold them are purged, see `saga purge`). Replace a key well
/// before it has encoded 2^32 payloads (the bound for random nonces).
pub struct AesGcmCodec {
    keys: Vec<(String, LessSafeKey)>,
    random: SystemRandom,
}

impl fmt::Debug for AesGcmCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("AesGcmCodec").field("keys", &ids).finish()
    }
}

impl AesGcmCodec {
    /// The length of a key, in bytes.
    pub const KEY_LEN: usize = 32;

    /// A codec with `keys` (id and 32 key bytes), the first for new writes.
    pub fn new<I, K>(keys: I) -> Result<Self, CodecError>
    where
        I: IntoIterator<Item = (String, K)>,
        K: AsRef<[u8]>,
    {
        let mut ring = Vec::new();
        for (n, (id, bytes)) in keys.into_iter().enumerate() {
            check_id(&id, n + 1)?;
            if ring.iter().any(|(known, _)| *known == id) {
                return Err(CodecError::Config(format!("key `{id}` is given twice")));
            }
            let bytes = bytes.as_ref();
            if bytes.len() != Self::KEY_LEN {
                return Err(CodecError::Config(format!(
                    "key {} has {} bytes; AES-256 takes {}",
                    n + 1,
                    bytes.len(),
                    Self::KEY_LEN
                )));
            }
            let key = UnboundKey::new(&AES_256_GCM, bytes)
                .map_err(|_| CodecError::Config(format!("key `{id}` is not usable")))?;
            ring.push((id, LessSafeKey::new(key)));
        }
        if ring.is_empty() {
            return Err(CodecError::Config("no key given".into()));
        }
        Ok(Self {
            keys: ring,
            random: SystemRandom::new(),
        })
    }

    /// A codec from `id:base64key` pairs separated by commas (the form of
    /// [`SAGA_PAYLOAD_KEYS`](super::SAGA_PAYLOAD_KEYS)), the first for new writes. Errors name
    /// the pair by its position and id, never its key.
    pub fn parse(keys: &str) -> Result<Self, CodecError> {
        let mut ring = Vec::new();
        for (n, pair) in keys.split(',').map(str::trim).enumerate() {
            let position = n + 1;
            let Some((id, key)) = pair.split_once(':') else {
                return Err(CodecError::Config(format!(
                    "pair {position} is not `id:base64key`"
                )));
            };
            // The id is checked first: one that is not valid is not shown.
            let id = id.trim();
            check_id(id, position)?;
            let bytes = STANDARD
                .decode(key.trim())
                .or_else(|_| STANDARD_NO_PAD.decode(key.trim()))
                .map_err(|_| {
                    CodecError::Config(format!("the key of pair {position} is not base64"))
                })?;
            ring.push((id.to_owned(), bytes));
        }
        Self::new(ring)
    }

    /// A new random key, base64-encoded, for `SAGA_PAYLOAD_KEYS` (`saga keygen` prints one).
    pub fn generate_key() -> String {
        let mut key = [0u8; Self::KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .expect("the system's random source works");
        STANDARD.encode(key)
    }

    /// The key ids, the one for new writes first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }
}

impl PayloadCodec for AesGcmCodec {
    fn encode(&self, plain: &[u8]) -> Result<Encoded, CodecError> {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| CodecError::Encode("the system's random source failed".into()))?;
        let mut data = Vec::with_capacity(NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        data.extend_from_slice(&nonce);
        data.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut data[NONCE_LEN..],
            )
            .map_err(|_| CodecError::Encode("AES-GCM refused the payload".into()))?;
        data.extend_from_slice(tag.as_ref());
        Ok(Encoded {
            key: id.clone(),
            data,
        })
    }

    fn decode(&self, key: &str, data: &[u8]) -> Result<Vec<u8>, CodecError> {
        let Some((id, cipher)) = self.keys.iter().find(|(id, _)| id == key) else {
            return Err(CodecError::UnknownKey {
                key: key.to_owned(),
            });
        };
        let corrupt = |why: &str| CodecError::Corrupt {
            key: key.to_owned(),
            why: why.to_owned(),
        };
        if data.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(corrupt("too short"));
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt("bad nonce"))?;
        let mut buf = sealed.to_vec();
        let plain = cipher
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut buf)
            .map_err(|_| corrupt("authentication failed"))?;
        let len = plain.len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// A key id is kept in the clear in every sealed value: short, and no separator of the
/// `SAGA_PAYLOAD_KEYS` form.
/// An invalid id is not shown: it may be a key given in the wrong place.
fn check_id(id: &str, position: usize) -> Result<(), CodecError> {
    // At most 32 characters: a key (at least 43 in base64) put in the id's place is refused
    // here, without being shown.
    let valid = !id.is_empty()
        && id.len() <= 32
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(CodecError::Config(format!(
            "the id of key {position} must be 1 to 32 letters, digits, `-`, `_` or `.`"
        )))
    }
}
