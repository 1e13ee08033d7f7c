//! Dataset readers against files written by other tools: LMDB datasets in NVAE's and LSUN's layouts (written by
//! Python's `lmdb` package, `tests/fixtures/lmdb/make.py`), WebP in image folders, and `lfm train` on LMDB data.

use lfm::data::lmdb::{LmdbImages, LmdbLayout};
use lfm::data::{load_image, open_images, ImageItem, Source};

use crate::common::*;

/// Pixel (x, y, c) of image `i` in the fixtures: `(31·i + 7·x + 3·y + 50·c) mod 256`.
fn pattern(i: usize, width: usize, height: usize) -> Vec<u8> {
    (0..height)
        .flat_map(|y| {
            (0..width).flat_map(move |x| (0..3).map(move |c| ((31 * i + 7 * x + 3 * y + 50 * c) % 256) as u8))
        })
        .collect()
}

/// `pattern(i)` cropped to the window `x0..x0 + 8`, `y0..y0 + 8`.
fn crop(i: usize, width: usize, height: usize, x0: usize, y0: usize) -> Vec<u8> {
    let full = pattern(i, width, height);
    (y0..y0 + 8).flat_map(|y| full[3 * (y * width + x0)..3 * (y * width + x0 + 8)].to_vec()).collect()
}

fn items(source: Source) -> Vec<ImageItem> {
    match source {
        Source::Images { items, labels, .. } => {
            assert!(labels.is_none(), "LMDB datasets are unlabelled, as in LFM");
            items
        }
        Source::Latents(_) => panic!("expected images"),
    }
}

#[test]
fn nvae_lmdb_reads_raw_rgb_in_index_order() {
    let path = fixture("lmdb/nvae.lmdb");
    assert_eq!(LmdbImages::open(&path).unwrap().layout(), LmdbLayout::Nvae);
    let all = items(open_images(&path, 8, false, None).unwrap());
    assert_eq!(all.len(), 12);
    // Index order, not key order: "10" and "11" sort before "2" as bytes.
    for (i, item) in all.iter().enumerate() {
        let image = load_image(item, 8, false).unwrap();
        assert_eq!(image.pixels, pattern(i, 8, 8), "image {i}");
    }
    // A flip mirrors the rows; --max-images keeps the first examples.
    let flipped = load_image(&all[3], 8, true).unwrap();
    assert_eq!(&flipped.pixels[..3], &pattern(3, 8, 8)[3 * 7..3 * 8]);
    let first = items(open_images(&path, 8, false, Some(5)).unwrap());
    assert_eq!(first.len(), 5);
    assert_eq!(load_image(&first[4], 8, false).unwrap().pixels, pattern(4, 8, 8));
    assert_eq!(load_image(&all[0], 4, false).unwrap().pixels.len(), 4 * 4 * 3);
}

#[test]
fn lsun_lmdb_decodes_images_in_key_order_and_names_a_bad_entry() {
    let path = fixture("lmdb/lsun.lmdb");
    assert_eq!(LmdbImages::open(&path).unwrap().layout(), LmdbLayout::Lsun);
    let all = items(open_images(&path, 8, false, None).unwrap());
    assert_eq!(all.len(), 5);
    // In key order the entries are: the non-image, then images 2, 0, 1, 3 (see make.py's output), each resized
    // (already 8 on its short side) and centre-cropped to 8×8.
    let err = load_image(&all[0], 8, false).unwrap_err();
    assert!(
        err.contains("lsun.lmdb key \"4826867323a7711a8133287637ebdcd9e87a1613\"")
            && err.contains("not an encoded image"),
        "{err}"
    );
    let want = [crop(2, 8, 8, 0, 0), crop(0, 12, 8, 2, 0), crop(1, 8, 10, 0, 1), crop(3, 16, 8, 4, 0)];
    for (k, want) in want.iter().enumerate() {
        assert_eq!(&load_image(&all[k + 1], 8, false).unwrap().pixels, want, "entry {}", k + 1);
    }
    assert_eq!(items(open_images(&path, 8, false, Some(2)).unwrap()).len(), 2);
}

#[test]
fn dataset_errors_name_the_problem() {
    let err = open_images(&fixture("lmdb/lsun.lmdb"), 8, true, None).unwrap_err();
    assert!(err.contains("--class-folders applies to image folders only"), "{err}");
    let err = open_images(&fixture("lmdb/missing.lmdb"), 8, false, None).unwrap_err();
    assert!(err.contains("missing.lmdb: no such file or folder"), "{err}");
    // A truncated environment is refused, not read as an empty dataset.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.lmdb");
    std::fs::create_dir(&broken).unwrap();
    let bytes = std::fs::read(fixture("lmdb/nvae.lmdb/data.mdb")).unwrap();
    std::fs::write(broken.join("data.mdb"), &bytes[..100]).unwrap();
    let err = open_images(&broken, 8, false, None).unwrap_err();
    assert!(err.contains("broken.lmdb: cannot read the LMDB dataset"), "{err}");
}

#[test]
fn image_folders_read_webp() {
    let dir = tempfile::tempdir().unwrap();
    let pixels = pattern(5, 8, 8);
    let image = image::RgbImage::from_raw(8, 8, pixels.clone()).unwrap();
    let file = std::fs::File::create(dir.path().join("a.webp")).unwrap();
    image::codecs::webp::WebPEncoder::new_lossless(file).encode(&image, 8, 8, image::ExtendedColorType::Rgb8).unwrap();
    let all = items(open_images(dir.path(), 8, false, None).unwrap());
    assert_eq!(all.len(), 1);
    assert_eq!(load_image(&all[0], 8, false).unwrap().pixels, pixels);
}

/// `lfm train` on LSUN-layout LMDB data: the bad entry is skipped and counted; `--max-images` limits the examples.
#[test]
fn training_reads_lmdb_data() {
    let s = crate::train::setup();
    let out = s.root.join("run");
    let lsun = fixture("lmdb/lsun.lmdb");
    // Three of the fixture's entries (one of them corrupt), each step a batch of all of them.
    let mut args =
        crate::train::train_args(out.to_str().unwrap(), lsun.to_str().unwrap(), &s.vae, &s.vae_config, &s.config);
    args.extend_from_slice(&["--max-images", "3", "--max-steps", "2"]);
    let (ok, stdout, stderr) = lfm(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained 2 steps on 3 examples"), "{stdout}");
    assert!(stderr.contains("skipping an unreadable image") && stderr.contains("not an encoded image"), "{stderr}");
    assert!(crate::train::losses(&out).iter().all(|l| l.is_finite()));
}

/// `lfm encode --data DIR --out CACHE`: a sharded cache holds the same posteriors as the one-file form (the corrupt
/// image skipped and counted), trains to the same losses, resumes an interrupted encode at its first missing shard,
/// refuses other settings without --force, and a damaged cache is refused clearly.
#[test]
fn a_sharded_latent_cache_matches_the_single_file_and_resumes() {
    use lfm::data::latents::LatentStore;
    let s = crate::train::setup();
    let cache = s.root.join("cache");
    let encode = |data: &str, out: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["--backend", "cpu", "encode", "--data", data, "--image-size", "16", "--weights", &s.vae];
        args.extend_from_slice(&["--config", &s.vae_config, "--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        lfm(&args)
    };
    let (ok, stdout, stderr) = encode(&s.data, &cache, &["--shard-size", "5"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("12 latents in 3 shards, 1 unreadable images skipped"), "{stdout}");
    assert!(stderr.contains("corrupt.png"), "{stderr}");
    // The one-file form of the same images.
    let single = s.root.join("latents.safetensors");
    let (ok, stdout, stderr) = encode(&s.data, &single, &[]);
    assert!(ok && stdout.contains("12 latents, 1 unreadable images skipped"), "{stdout}{stderr}");
    let all: Vec<usize> = (0..12).collect();
    let same_posteriors = |what: &str| {
        let (a, b) = (LatentStore::open(&cache).unwrap(), LatentStore::open(&single).unwrap());
        assert_eq!((a.shape(), a.has_std()), (b.shape(), b.has_std()));
        assert_eq!(a.shape(), [12, 4, 8, 8]);
        let ((mean_a, std_a), (mean_b, std_b)) = (a.gather(&all).unwrap(), b.gather(&all).unwrap());
        assert_close(&format!("{what}: means"), &mean_a, &mean_b, 1e-6, 1e-7);
        assert_close(&format!("{what}: stds"), &std_a.unwrap(), &std_b.unwrap(), 1e-6, 1e-7);
        // A batch in shuffled order, across shards.
        let (mean, _) = a.gather(&[11, 0, 7, 5]).unwrap();
        let want: Vec<f32> = [11, 0, 7, 5].iter().flat_map(|&i| mean_b[i * 256..(i + 1) * 256].to_vec()).collect();
        assert_close(&format!("{what}: a shuffled batch"), &mean, &want, 1e-6, 1e-7);
    };
    same_posteriors("fresh");

    // Training reads the cache a batch at a time and takes the same steps as from the file.
    let train = |latents: &std::path::Path, out: &str| {
        let mut args = vec!["--backend", "cpu", "train", "--latents", latents.to_str().unwrap(), "--config", &s.config];
        args.extend_from_slice(&["--out", out, "--batch-size", "4", "--max-steps", "2", "--seed", "5"]);
        lfm(&args)
    };
    let (run_cache, run_file) = (s.root.join("run-cache"), s.root.join("run-file"));
    for (latents, run) in [(&cache, &run_cache), (&single, &run_file)] {
        let (ok, _, stderr) = train(latents, run.to_str().unwrap());
        assert!(ok, "{stderr}");
    }
    let (from_cache, from_file) = (crate::train::losses(&run_cache), crate::train::losses(&run_file));
    assert_eq!(from_cache.len(), 2);
    for (a, b) in from_cache.iter().zip(&from_file) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "losses from the cache {from_cache:?} vs the file {from_file:?}");
    }

    // An encode interrupted before its last shard: training refuses the cache; the same command finishes it,
    // rewriting only the missing shard.
    let index_path = cache.join("index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["shards"].as_array_mut().unwrap().pop();
    index["complete"] = false.into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    std::fs::remove_file(cache.join("shard-00002.safetensors")).unwrap();
    let (ok, _, stderr) = train(&cache, s.root.join("run-incomplete").to_str().unwrap());
    assert!(!ok && stderr.contains("incomplete (2 of 3 shards)") && stderr.contains("lfm encode"), "{stderr}");
    #[cfg(unix)]
    let inode = |k: usize| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(cache.join(format!("shard-{k:05}.safetensors"))).unwrap().ino()
    };
    #[cfg(unix)]
    let kept = [inode(0), inode(1)];
    // The same command as the first.
    let (ok, stdout, stderr) = encode(&s.data, &cache, &["--shard-size", "5"]);
    assert!(ok && stdout.contains("12 latents in 3 shards"), "{stdout}{stderr}");
    #[cfg(unix)]
    assert_eq!([inode(0), inode(1)], kept, "finished shards are not rewritten");
    same_posteriors("resumed");

    // Other settings are refused without --force, and replace the cache with it.
    let (ok, _, stderr) = encode(&s.data, &cache, &["--shard-size", "4"]);
    assert!(!ok && stderr.contains("--shard-size 5 there, 4 now") && stderr.contains("--force"), "{stderr}");
    let (ok, stdout, stderr) = encode(&s.data, &cache, &["--shard-size", "4", "--force"]);
    assert!(ok && stdout.contains("12 latents in 4 shards"), "{stdout}{stderr}");
    assert!(!cache.join("shard-00004.safetensors").exists());
    same_posteriors("re-sharded");

    // A truncated shard is named, with the fix.
    let shard = cache.join("shard-00001.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let error = LatentStore::open(&cache).unwrap_err();
    assert!(error.contains("shard-00001") && error.contains("truncated") && error.contains("--force"), "{error}");
}
