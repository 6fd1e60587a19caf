//! The CA's root on disk: `root-cert.pem` and `root-key.pem` in one directory, created once
//! (mode 0700 directory, 0600 files, written atomically) and reused on every later start. Never
//! overwrites or deletes existing material; anything it cannot use is an error naming the file.

use std::fs::{self, DirBuilder, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use weft_core::identity::validate_trust_domain;
use weft_core::tls::{parse_pem_certs, CertificateAuthority};

use super::CaError;

/// The root certificate's file name inside the CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The root key's file name inside the CA directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Loads the root stored in `dir`, or on first start creates `dir` and a new root for
/// `trust_domain` in it. Loading checks that the key is the certificate's.
pub fn load_or_create_root(dir: &Path, trust_domain: &str) -> Result<CertificateAuthority, CaError> {
    // Check the trust domain before anything is written.
    validate_trust_domain(trust_domain)
        .map_err(|e| CaError::TrustDomain { trust_domain: trust_domain.to_owned(), source: e })?;
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    let ca = match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => load(trust_domain, &cert_path, &key_path)?,
        (false, false) => create(dir, trust_domain, &cert_path, &key_path)?,
        (true, false) => return Err(CaError::Incomplete { present: cert_path, missing: key_path }),
        (false, true) => return Err(CaError::Incomplete { present: key_path, missing: cert_path }),
    };
    Ok(ca)
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(|source| CaError::Read { path: path.to_owned(), source })
}

fn load(trust_domain: &str, cert_path: &Path, key_path: &Path) -> Result<CertificateAuthority, CaError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    warn_if_readable_by_others(key_path);

    // Check each file on its own first, so that the error names the file that is wrong.
    let unparsable = |path: &Path, reason: String| CaError::Unparsable { path: path.to_owned(), reason };
    match parse_pem_certs(&cert_pem) {
        Ok(certs) if certs.is_empty() => {
            return Err(unparsable(cert_path, "no PEM \"CERTIFICATE\" block".into()));
        }
        Ok(_) => {}
        Err(e) => return Err(unparsable(cert_path, e.to_string())),
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| unparsable(key_path, format!("no PEM private key: {e}")))?;
    weft_core::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| unparsable(key_path, format!("the private key is unusable: {e}")))?;

    let ca = CertificateAuthority::from_pem(trust_domain, &cert_pem, &key_pem).map_err(|e| {
        CaError::Mismatch { cert: cert_path.to_owned(), key: key_path.to_owned(), reason: e.to_string() }
    })?;
    tracing::info!(dir = %parent(cert_path).display(), "loaded the CA root");
    Ok(ca)
}

fn read(path: &Path) -> Result<String, CaError> {
    let bytes = fs::read(path).map_err(|source| CaError::Read { path: path.to_owned(), source })?;
    String::from_utf8(bytes).map_err(|_| CaError::Unparsable {
        path: path.to_owned(),
        reason: "it is not UTF-8 text (PEM)".into(),
    })
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "the CA's root key is readable by other users; chmod 600 it"
            );
        }
    }
}

fn create(
    dir: &Path,
    trust_domain: &str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertificateAuthority, CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| CaError::CreateDir { path: dir.to_owned(), source })?;
    let ca = CertificateAuthority::generate(trust_domain).map_err(CaError::Generate)?;
    // The key goes first: the certificate's presence marks a complete root.
    write_new(key_path, ca.key_pem())?;
    write_new(cert_path, ca.cert_pem())?;
    sync_dir(dir)?;
    tracing::info!(dir = %dir.display(), trust_domain, "created a new CA root");
    Ok(ca)
}

/// Writes `contents` to `path`, which must not exist: through a 0600 temporary file in the same
/// directory, synced, then linked into place without replacing anything.
fn write_new(path: &Path, contents: &str) -> Result<(), CaError> {
    let write_err = |source: io::Error| CaError::Write { path: path.to_owned(), source };
    let dir = parent(path);
    let prefix = format!(".{}.", path.file_name().and_then(|n| n.to_str()).unwrap_or("root"));
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(Permissions::from_mode(FILE_MODE))
        .tempfile_in(dir)
        .map_err(write_err)?;
    tmp.write_all(contents.as_bytes()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist_noclobber(path).map_err(|e| write_err(e.error))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), CaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CaError::Write { path: dir.to_owned(), source })
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_private_files_then_reuses_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/ca");
        let first = load_or_create_root(&dir, "cluster.local").unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&dir.join(ROOT_CERT_FILE)), FILE_MODE);
        assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), FILE_MODE);
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary files are left behind: {names:?}");
        let second = load_or_create_root(&dir, "cluster.local").unwrap();
        assert_eq!(first.root_pem(), second.root_pem());
        assert_eq!(first.key_pem(), second.key_pem());
    }

    #[test]
    fn refuses_a_bad_trust_domain_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let err = load_or_create_root(&dir, "Not A Domain").err().unwrap();
        assert!(err.to_string().contains("Not A Domain"), "{err}");
        assert!(!dir.exists());
    }

    #[test]
    fn a_key_from_another_root_is_a_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        load_or_create_root(dir, "cluster.local").unwrap();
        let other = CertificateAuthority::generate("cluster.local").unwrap();
        let key_path = dir.join(ROOT_KEY_FILE);
        fs::write(&key_path, other.key_pem()).unwrap();
        let err = load_or_create_root(dir, "cluster.local").err().unwrap();
        assert!(matches!(err, CaError::Mismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(ROOT_KEY_FILE) && msg.contains(ROOT_CERT_FILE), "{msg}");
        assert_eq!(fs::read_to_string(&key_path).unwrap(), other.key_pem(), "left as it was");
    }
}
