//! LMDB image datasets, read as LFM reads them:
//! - **NVAE's layout** (LFM's `celeba_256`, `ffhq_256`: `<datadir>/train.lmdb`): key `str(i)` for `i` in
//!   `0..entries`, value the raw HWC RGB bytes of a square image; examples in index order.
//! - **LSUN's layout** (`church_outdoor_train_lmdb`, `bedroom_train_lmdb`): any keys, values encoded images
//!   (WebP, JPEG, PNG); examples in key order, as torchvision's `LSUNClass` lists them.
//!
//! The environment is opened read-only and without LMDB's lock file, so datasets on read-only storage work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions};

/// How the values of a dataset are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmdbLayout {
    /// NVAE: keys `0..N` as decimal text, raw RGB bytes of square images.
    Nvae,
    /// LSUN: keys in byte order, encoded images.
    Lsun,
}

/// An open LMDB image dataset.
pub struct LmdbImages {
    env: Env,
    db: Database<Bytes, Bytes>,
    path: PathBuf,
    layout: LmdbLayout,
}

impl std::fmt::Debug for LmdbImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbImages").field("path", &self.path).field("layout", &self.layout).finish()
    }
}

/// Whether `path` is an LMDB environment: a folder holding `data.mdb`, or an `.mdb` file.
pub fn is_lmdb(path: &Path) -> bool {
    path.join("data.mdb").is_file() || (path.is_file() && path.extension().is_some_and(|e| e == "mdb"))
}

impl LmdbImages {
    /// Opens the environment at `path` (a folder with `data.mdb`, or the `.mdb` file itself) and detects its layout.
    /// An environment is opened once per process (LMDB forbids a second handle on the same file) and shared.
    pub fn open(path: &Path) -> Result<Arc<Self>, String> {
        static OPEN: Mutex<BTreeMap<PathBuf, Arc<LmdbImages>>> = Mutex::new(BTreeMap::new());
        let canonical = path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))?;
        let mut open = OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(db) = open.get(&canonical) {
            return Ok(db.clone());
        }
        let db = Arc::new(Self::open_new(path)?);
        open.insert(canonical, db.clone());
        Ok(db)
    }

    fn open_new(path: &Path) -> Result<Self, String> {
        let err = |e: heed::Error| format!("{}: cannot read the LMDB dataset: {e}", path.display());
        let mut flags = EnvFlags::READ_ONLY | EnvFlags::NO_LOCK;
        if path.is_file() {
            flags |= EnvFlags::NO_SUB_DIR;
        }
        let mut options = EnvOpenOptions::new();
        // SAFETY: the environment is opened read-only and without locking; lfm never writes to it, and the user is
        // told (in `lfm train --help`) not to train from a dataset that another process is writing.
        let env = unsafe {
            options.flags(flags);
            options.open(path)
        }
        .map_err(err)?;
        let txn = env.read_txn().map_err(err)?;
        let db: Database<Bytes, Bytes> = env
            .open_database(&txn, None)
            .map_err(err)?
            .ok_or_else(|| format!("{}: the LMDB environment has no main database", path.display()))?;
        let entries = db.len(&txn).map_err(err)?;
        let has = |i: u64| db.get(&txn, i.to_string().as_bytes()).map(|v| v.is_some());
        let layout = if entries > 0 && has(0).map_err(err)? && has(entries - 1).map_err(err)? {
            LmdbLayout::Nvae
        } else {
            LmdbLayout::Lsun
        };
        drop(txn);
        Ok(Self { env, db, path: path.to_path_buf(), layout })
    }

    /// The detected layout.
    pub fn layout(&self) -> LmdbLayout {
        self.layout
    }

    /// The keys of the first `max` examples (all without `max`), in the dataset's order.
    pub fn keys(&self, max: Option<usize>) -> Result<Vec<Box<[u8]>>, String> {
        let err = |e: heed::Error| format!("{}: {e}", self.path.display());
        let txn = self.env.read_txn().map_err(err)?;
        let entries = self.db.len(&txn).map_err(err)? as usize;
        let count = max.map_or(entries, |m| m.min(entries));
        match self.layout {
            LmdbLayout::Nvae => Ok((0..count).map(|i| i.to_string().into_bytes().into_boxed_slice()).collect()),
            LmdbLayout::Lsun => {
                let mut keys = Vec::with_capacity(count);
                for entry in self.db.iter(&txn).map_err(err)?.take(count) {
                    keys.push(entry.map_err(err)?.0.into());
                }
                Ok(keys)
            }
        }
    }

    /// Decodes the image stored under `key`.
    pub fn image(&self, key: &[u8]) -> Result<image::RgbImage, String> {
        let name = || format!("{} key {:?}", self.path.display(), String::from_utf8_lossy(key));
        let txn = self.env.read_txn().map_err(|e| format!("{}: {e}", name()))?;
        let value = self
            .db
            .get(&txn, key)
            .map_err(|e| format!("{}: {e}", name()))?
            .ok_or_else(|| format!("{}: no such entry", name()))?;
        if self.layout == LmdbLayout::Nvae {
            let side = ((value.len() / 3) as f64).sqrt().round() as usize;
            if side > 0 && 3 * side * side == value.len() {
                return Ok(image::RgbImage::from_raw(side as u32, side as u32, value.to_vec()).expect("3·side² bytes"));
            }
        }
        let decoded = image::load_from_memory(value).map_err(|e| {
            let what = match self.layout {
                LmdbLayout::Nvae => "neither raw square RGB bytes nor an encoded image",
                LmdbLayout::Lsun => "not an encoded image",
            };
            format!("{}: {what} ({} bytes): {e}", name(), value.len())
        })?;
        Ok(decoded.to_rgb8())
    }
}
