//! The node's persisted secp256k1 identity (`net-privkey`).
//!
//! The file holds the libp2p protobuf encoding of the private key,
//! `08 02 12 20 ‖ 32 bytes`, readable by its owner only.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p_identity::{KeyType, Keypair, PeerId};

use crate::error::{Error, Result};

/// Loads the key at `path`, creating it when the file does not exist.
pub(crate) fn load_or_create(path: &Path) -> Result<Keypair> {
    match fs::read(path) {
        Ok(bytes) => decode(path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(e) => Err(Error::io(format!("reading key file {}", path.display()), e)),
    }
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair> {
    let key = Keypair::from_protobuf_encoding(bytes).map_err(|e| Error::Config {
        key: "net-privkey".into(),
        message: format!("{} is not a libp2p private key: {e}", path.display()),
    })?;
    if key.key_type() != KeyType::Secp256k1 {
        return Err(Error::Config {
            key: "net-privkey".into(),
            message: format!(
                "{} holds a {:?} key; Codex uses secp256k1",
                path.display(),
                key.key_type()
            ),
        });
    }
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "key file is readable by others");
        }
    }
    Ok(key)
}

fn create(path: &Path) -> Result<Keypair> {
    let key = Keypair::generate_secp256k1();
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| Error::State(format!("encoding a new key: {e}")))?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let ctx = || format!("writing key file {}", path.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(ctx(), e))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(ctx(), e))?;
    tracing::info!(path = %path.display(), peer = %PeerId::from(key.public()), "created node key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let a = load_or_create(&path).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 36);
        assert_eq!(&bytes[..4], &[0x08, 0x02, 0x12, 0x20]);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = load_or_create(&path).unwrap();
        let id = PeerId::from(a.public());
        assert_eq!(id, PeerId::from(b.public()));
        assert!(id.to_base58().starts_with("16Uiu2"), "{id}");
    }

    #[test]
    fn garbage_and_foreign_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        fs::write(&path, b"not a key").unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("net-privkey"), "{e}");
    }
}
