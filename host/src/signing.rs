//! Code integrity (G2): providers sign their components with Ed25519, and a
//! bundle can require that every component of a domain be signed by one of
//! the domain's trusted keys.
//!
//! What is signed is the component's sha256 digest, prefixed with a fixed
//! context string so a signature cannot be replayed as any other kind of
//! Ed25519 signature. A detached signature file (`<component>.sig`) names
//! the signing key and holds the signature, both hex:
//!
//! ```text
//! ed25519:<public key>
//! <signature>
//! ```
//!
//! Naming the key lets the runtime tell a signature by an untrusted key from
//! a tampered one. Keys and signatures come from `hyperty keygen` and
//! `hyperty sign`; the cryptography is `ed25519-dalek`'s.

use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Deserializer};

use crate::engine::Digest;

const CONTEXT: &[u8] = b"rethink-hyperty-component-signature-v1\0";

/// A provider's public key, written `ed25519:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let bad = || format!("{text:?} is not a public key (ed25519:<64 hex digits>)");
        let hex_text = text.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut bytes).map_err(|_| bad())?;
        VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| bad())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        PublicKey::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn signed_bytes(digest: Digest) -> Vec<u8> {
    [CONTEXT, &digest.0].concat()
}

/// Creates a key pair: writes the secret key (hex) to `secret_path`,
/// readable by its owner only, and returns the public key.
pub fn keygen(secret_path: &Path) -> Result<PublicKey> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("no randomness for the key")?;
    let key = SigningKey::from_bytes(&seed);
    crate::private::write_file(secret_path, &hex::encode(seed))?;
    Ok(PublicKey(key.verifying_key()))
}

/// The public key of the secret key at `secret_path`.
pub fn keygen_public(secret_path: &Path) -> Result<PublicKey> {
    Ok(PublicKey(read_secret(secret_path)?.verifying_key()))
}

fn read_secret(secret_path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(secret_path).with_context(|| format!("cannot read {}", secret_path.display()))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).with_context(|| format!("{} is not a hyperty secret key", secret_path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Signs the component at `component` with the secret key at `secret_path`;
/// returns the signature file's text.
pub fn sign(secret_path: &Path, component: &Path) -> Result<String> {
    let key = read_secret(secret_path)?;
    let bytes = std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    let signature = key.sign(&signed_bytes(Digest::of(&bytes)));
    Ok(format!("{}\n{}\n", PublicKey(key.verifying_key()), hex::encode(signature.to_bytes())))
}

/// Checks the signature file text `signature` over a component with
/// `digest` against the `trusted` keys; the error says what is wrong.
pub fn verify(signature: &str, digest: Digest, trusted: &[PublicKey]) -> Result<(), String> {
    let mut lines = signature.lines();
    let (Some(key_line), Some(sig_line)) = (lines.next(), lines.next()) else {
        return Err("the signature file is malformed (expected a key line and a signature line)".into());
    };
    let key = PublicKey::parse(key_line).map_err(|e| format!("the signature file is malformed: {e}"))?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(sig_line.trim(), &mut sig)
        .map_err(|_| "the signature file is malformed: the signature is not 128 hex digits".to_owned())?;
    if !trusted.contains(&key) {
        return Err(format!("signed by {key}, a key the domain does not trust"));
    }
    key.0
        .verify(&signed_bytes(digest), &Signature::from_bytes(&sig))
        .map_err(|_| format!("the signature by {key} does not verify: the component or its signature was tampered with"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_and_refuse_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = (dir.path().join("one.key"), dir.path().join("two.key"));
        let (p1, p2) = (keygen(&k1).unwrap(), keygen(&k2).unwrap());
        let component = dir.path().join("c.wasm");
        std::fs::write(&component, b"component bytes").unwrap();
        let sig = sign(&k1, &component).unwrap();
        let digest = Digest::of(b"component bytes");
        assert_eq!(verify(&sig, digest, &[p1]), Ok(()));
        assert!(verify(&sig, digest, &[p2]).unwrap_err().contains("does not trust"));
        assert!(verify(&sig, Digest::of(b"other"), &[p1]).unwrap_err().contains("tampered"));
        // Change the signature's first hex digit (to another one: a fixed
        // replacement would be no change when the signature starts with it).
        let line = sig.lines().nth(1).unwrap();
        let other = if line.starts_with('0') { "1" } else { "0" };
        let flipped = sig.replacen(line, &format!("{other}{}", &line[1..]), 1);
        assert_ne!(flipped, sig);
        assert!(verify(&flipped, digest, &[p1, p2]).is_err());
        assert!(verify("garbage", digest, &[p1]).unwrap_err().contains("malformed"));
        assert_eq!(PublicKey::parse(&p1.to_string()), Ok(p1));
        assert!(keygen(&k1).is_err(), "never overwrites a key");
    }
}
