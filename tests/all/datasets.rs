//! Dataset readers against files written by other tools: LMDB datasets in NVAE's and LSUN's layouts (written by
//! Python's `lmdb` package, `tests/fixtures/lmdb/make.py`), WebP in image folders, and `lfm train` on LMDB data.

use lfm::train::data::{load_image, open_images, ImageItem, Source};
use lfm::train::lmdb::{LmdbImages, LmdbLayout};

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
        Source::Latents { .. } => panic!("expected images"),
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
    let (ok, stdout, stderr) = lfm(&[
        "--backend",
        "cpu",
        "train",
        "--data",
        lsun.to_str().unwrap(),
        "--max-images",
        "3",
        "--image-size",
        "16",
        "--weights",
        &s.vae,
        "--vae-config",
        &s.vae_config,
        "--config",
        &s.config,
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "3",
        "--max-steps",
        "2",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("trained 2 steps on 3 examples"), "{stdout}");
    assert!(stderr.contains("skipping an unreadable image") && stderr.contains("not an encoded image"), "{stderr}");
    assert!(crate::train::losses(&out).iter().all(|l| l.is_finite()));
}
