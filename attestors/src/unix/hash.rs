//! SHA-256 of executables, with a bounded cache so that a binary attested again and again (every
//! request of a long-running workload) is read once.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, PoisonError};

use aws_lc_rs::digest;

/// How much of a file is read at a time while hashing.
const CHUNK: usize = 64 * 1024;

/// What identifies one version of a file's contents without reading them.
///
/// The modification time alone is not enough: a file's owner can set it to any value, so a
/// binary could be rewritten and its old mtime restored. The change time (ctime) is set by the
/// kernel on every write and every metadata change and cannot be chosen by the owner, so it is
/// part of the key too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    dev: u64,
    ino: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ctime_sec: i64,
    ctime_nsec: i64,
    size: u64,
}

impl FileKey {
    fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime_sec: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            size: meta.size(),
        }
    }
}

/// A bounded map from file versions to their SHA-256.
#[derive(Debug)]
pub(crate) struct HashCache {
    entries: Mutex<HashMap<FileKey, [u8; 32]>>,
    capacity: usize,
    /// How many files were actually read and hashed, so tests can tell a cache hit from a
    /// re-read without relying on timing.
    #[cfg(test)]
    computed: std::sync::atomic::AtomicUsize,
}

impl HashCache {
    /// An empty cache holding at most `capacity` hashes.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
            #[cfg(test)]
            computed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The SHA-256 of an open file's contents as lowercase hex, or `None` when the file is
    /// bigger than `max_bytes` or changed while it was being read.
    ///
    /// The metadata comes from the open file (fstat), not from a path, so the key and the
    /// contents belong to the same inode.
    pub(crate) fn sha256_hex(&self, mut file: &File, max_bytes: u64) -> io::Result<Option<String>> {
        let before = FileKey::of(&file.metadata()?);
        if before.size > max_bytes {
            return Ok(None);
        }
        if let Some(hash) = self.lock().get(&before) {
            return Ok(Some(hex::encode(hash)));
        }

        #[cfg(test)]
        self.computed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The lock is not held while reading: hashing a large binary must not stall the
        // attestation of other workloads.
        let mut context = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; CHUNK];
        let mut total: u64 = 0;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n as u64;
            if total > max_bytes {
                // The file grew past the cap after it was measured.
                return Ok(None);
            }
            context.update(&buf[..n]);
        }
        let after = FileKey::of(&file.metadata()?);
        if after != before || total != before.size {
            // The contents changed while being read, so the digest is of no single version.
            return Ok(None);
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(context.finish().as_ref());

        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&before) {
            // Any entry will do: a miss costs one re-read, and the bound is what matters.
            if let Some(victim) = entries.keys().next().copied() {
                entries.remove(&victim);
            }
        }
        if self.capacity > 0 {
            entries.insert(before, hash);
        }
        Ok(Some(hex::encode(hash)))
    }

    /// The map, even if a thread panicked while holding it: every update leaves it consistent.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, [u8; 32]>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many files were read and hashed rather than found in the cache.
    #[cfg(test)]
    pub(crate) fn computed(&self) -> usize {
        self.computed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many hashes the cache holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    fn file_with(dir: &std::path::Path, name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn expected(contents: &[u8]) -> String {
        hex::encode(digest::digest(&digest::SHA256, contents))
    }

    #[test]
    fn hashes_are_cached_and_the_cache_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HashCache::new(2);
        for (i, contents) in [b"one".as_slice(), b"two", b"three"].iter().enumerate() {
            let path = file_with(dir.path(), &i.to_string(), contents);
            let file = File::open(&path).unwrap();
            let hash = cache.sha256_hex(&file, 1024).unwrap();
            assert_eq!(hash.as_deref(), Some(expected(contents).as_str()));
            assert!(cache.len() <= 2);
        }
        assert_eq!(cache.computed(), 3);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_rewrite_with_the_old_mtime_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), "bin", b"original");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let cache = HashCache::new(16);
        let first = cache.sha256_hex(&File::open(&path).unwrap(), 1024).unwrap();
        assert_eq!(first, Some(expected(b"original")));

        // Same size, same mtime restored: only the ctime, which the kernel sets, differs.
        std::thread::sleep(Duration::from_millis(20));
        let mut writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all(b"replaced").unwrap();
        writer.set_modified(mtime).unwrap();
        drop(writer);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);

        let second = cache.sha256_hex(&File::open(&path).unwrap(), 1024).unwrap();
        assert_eq!(second, Some(expected(b"replaced")));
        assert_eq!(cache.computed(), 2);
    }

    #[test]
    fn files_over_the_cap_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), "big", &[7u8; 100]);
        let cache = HashCache::new(16);
        assert_eq!(
            cache.sha256_hex(&File::open(&path).unwrap(), 99).unwrap(),
            None
        );
        assert_eq!(cache.computed(), 0);
        // Positive control: a cap of exactly the size hashes it.
        assert_eq!(
            cache.sha256_hex(&File::open(&path).unwrap(), 100).unwrap(),
            Some(expected(&[7u8; 100]))
        );
    }
}
