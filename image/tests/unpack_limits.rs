//! Decompression bombs, member-count caps, oversized extension headers and
//! truncated blobs.

mod common;

use std::io::Write;

use banger_image::unpack::{Compression, Limits, UnpackError};
use common::*;

const MIB: u64 = 1 << 20;

/// Sum of file sizes actually on disk under the staging root.
fn bytes_on_disk(sb: &Sandbox) -> u64 {
    sb.tree()
        .values()
        .filter(|n| n.kind == 'f')
        .map(|n| n.content.len() as u64)
        .sum()
}

/// A tar with one `size`-byte file of zeros, streamed into `w` so the
/// test never holds the decompressed bomb in memory.
fn zero_file_tar(w: &mut impl Write, name: &str, size: u64) {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    w.write_all(h.as_bytes()).expect("write");
    let chunk = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB);
        w.write_all(&chunk[..n as usize]).expect("write");
        left -= n;
    }
    let pad = (512 - size % 512) % 512;
    w.write_all(&vec![0u8; pad as usize + 1024]).expect("write");
}

fn gzip_bomb(size: u64) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    zero_file_tar(&mut e, "bomb", size);
    e.finish().expect("gzip")
}

fn zstd_bomb(size: u64) -> Vec<u8> {
    let mut e = zstd::Encoder::new(Vec::new(), 3).expect("zstd");
    zero_file_tar(&mut e, "bomb", size);
    e.finish().expect("zstd")
}

#[tokio::test]
async fn gzip_bomb_stops_at_max_image_bytes() {
    let blob = gzip_bomb(128 * MIB);
    assert!(
        blob.len() < 1024 * 1024,
        "a real bomb: {} bytes",
        blob.len()
    );
    let sb = Sandbox::new();
    let limits = Limits {
        max_image_bytes: 8 * MIB,
        ..Limits::default()
    };
    let err = sb
        .unpack_with(vec![(L1, Compression::Gzip, blob)], limits)
        .await
        .expect_err("bomb");
    assert!(
        matches!(err, UnpackError::ImageTooLarge { limit, .. } if limit == 8 * MIB),
        "{err:?}"
    );
    assert_names(&err, L1, "bomb");
    assert!(
        bytes_on_disk(&sb) <= 8 * MIB,
        "{} written",
        bytes_on_disk(&sb)
    );
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn zstd_bomb_stops_at_max_image_bytes() {
    let blob = zstd_bomb(1024 * MIB);
    assert!(
        blob.len() < 1024 * 1024,
        "a real bomb: {} bytes",
        blob.len()
    );
    let sb = Sandbox::new();
    let limits = Limits {
        max_image_bytes: 16 * MIB,
        ..Limits::default()
    };
    let err = sb
        .unpack_with(vec![(L1, Compression::Zstd, blob)], limits)
        .await
        .expect_err("bomb");
    assert!(matches!(err, UnpackError::ImageTooLarge { .. }), "{err:?}");
    assert_names(&err, L1, "bomb");
    assert!(bytes_on_disk(&sb) <= 16 * MIB);
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn the_limit_counts_bytes_written_over_all_layers() {
    let sb = Sandbox::new();
    let limits = Limits {
        max_image_bytes: MIB,
        ..Limits::default()
    };
    let l1 = LayerBuilder::new().file("a", vec![1u8; 600 * 1024]).tar();
    let l2 = LayerBuilder::new().file("a", vec![2u8; 600 * 1024]).tar();
    let mut u = sb.unpacker(limits);
    let s1 = u
        .apply_layer(L1, Compression::None, std::io::Cursor::new(l1))
        .await
        .expect("first layer fits");
    assert_eq!(s1.bytes_written, 600 * 1024);
    let err = u
        .apply_layer(L2, Compression::None, std::io::Cursor::new(l2))
        .await
        .expect_err("second does not");
    assert!(matches!(err, UnpackError::ImageTooLarge { .. }), "{err:?}");
    assert_names(&err, L2, "a");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn header_claims_are_not_trusted_either_way() {
    // A member whose header claims 100 GiB but whose stream ends after a
    // few bytes is a truncation, not an up-front "too large".
    let sb = Sandbox::new();
    let mut tar = LayerBuilder::new()
        .entry(
            Entry::new(b'0', "liar")
                .data(vec![1u8; 1000])
                .ustar_size(100 << 30),
        )
        .unterminated();
    tar.truncate(512 + 1000);
    let limits = Limits {
        max_image_bytes: 200 << 30,
        ..Limits::default()
    };
    let err = sb
        .unpack_with(vec![(L1, Compression::None, tar)], limits)
        .await
        .expect_err("truncated");
    assert!(matches!(err, UnpackError::Truncated { .. }), "{err:?}");
    assert_names(&err, L1, "liar");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn member_count_is_capped() {
    let mut b = LayerBuilder::new();
    for i in 0..500 {
        b = b.file(&format!("f{i}"), "");
    }
    let sb = Sandbox::new();
    let limits = Limits {
        max_entries: 100,
        ..Limits::default()
    };
    let err = sb
        .unpack_with(vec![(L1, Compression::Gzip, gzip(&b.tar()))], limits)
        .await
        .expect_err("too many");
    assert!(
        matches!(err, UnpackError::TooManyEntries { limit: 100, .. }),
        "{err:?}"
    );
    assert_names(&err, L1, "f100");
    assert_eq!(sb.tree().len(), 100);
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn payload_that_is_never_written_is_bounded_too() {
    // A whiteout with a 1 GiB body: nothing is written, but decompressing
    // it is work; the stream budget stops it.
    let mut e = zstd::Encoder::new(Vec::new(), 3).expect("zstd");
    zero_file_tar(&mut e, ".wh.x", 1024 * MIB);
    let blob = e.finish().expect("zstd");
    let sb = Sandbox::new();
    let limits = Limits {
        max_image_bytes: 4 * MIB,
        ..Limits::default()
    };
    let err = sb
        .unpack_with(vec![(L1, Compression::Zstd, blob)], limits)
        .await
        .expect_err("stream too large");
    assert!(matches!(err, UnpackError::StreamTooLarge { .. }), "{err:?}");
    assert_names(&err, L1, ".wh.x");

    // Junk after the end-of-archive marker counts as well.
    let mut e = zstd::Encoder::new(Vec::new(), 3).expect("zstd");
    e.write_all(&LayerBuilder::new().file("ok", "ok").tar())
        .expect("write");
    e.write_all(&vec![0u8; 64 * MIB as usize]).expect("write"); // > 4 MiB + 16 MiB slack
    let blob = e.finish().expect("zstd");
    let sb = Sandbox::new();
    let err = sb
        .unpack_with(vec![(L1, Compression::Zstd, blob)], limits)
        .await
        .expect_err("trailing junk");
    assert!(matches!(err, UnpackError::StreamTooLarge { .. }), "{err:?}");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn oversized_extension_headers_are_refused() {
    let sb = Sandbox::new();
    let tar = LayerBuilder::new()
        .entry(
            Entry::new(b'0', "f")
                .data("x")
                .pax("comment", vec![b'a'; 2 << 20]),
        )
        .tar();
    let err = sb
        .unpack(vec![(L1, Compression::Gzip, gzip(&tar))])
        .await
        .expect_err("huge PAX header");
    assert!(
        matches!(err, UnpackError::ExtensionTooLarge { .. }),
        "{err:?}"
    );
    assert_eq!(err.layer(), Some(L1));
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn truncated_plain_tar_mid_member() {
    let tar = LayerBuilder::new()
        .file("first", "complete")
        .file("second", vec![9u8; 5000])
        .tar();
    let sb = Sandbox::new();
    let cut = tar[..512 + 512 + 512 + 3000].to_vec();
    let err = sb
        .unpack(vec![(L1, Compression::None, cut)])
        .await
        .expect_err("truncated");
    assert!(matches!(err, UnpackError::Truncated { .. }), "{err:?}");
    assert_names(&err, L1, "second");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn truncated_plain_tar_mid_header_or_without_end_marker() {
    let members = LayerBuilder::new()
        .file("first", "complete")
        .file("second", "also complete")
        .unterminated();
    // Cut inside the second header.
    let sb = Sandbox::new();
    let err = sb
        .unpack(vec![(
            L1,
            Compression::None,
            members[..1024 + 100].to_vec(),
        )])
        .await
        .expect_err("truncated header");
    assert!(matches!(err, UnpackError::Truncated { .. }), "{err:?}");
    assert_eq!(err.layer(), Some(L1));
    // Cut exactly between members: no end-of-archive marker.
    let sb = Sandbox::new();
    let err = sb
        .unpack(vec![(L1, Compression::None, members.clone())])
        .await
        .expect_err("missing end marker");
    assert!(matches!(err, UnpackError::Truncated { .. }), "{err:?}");
    assert_names(&err, L1, "second");
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn truncated_gzip_and_zstd_streams() {
    let tar = LayerBuilder::new()
        .file("a", vec![3u8; 200_000])
        .file("b", "b")
        .tar();
    for (c, blob) in [
        (Compression::Gzip, gzip(&tar)),
        (Compression::Zstd, zstd(&tar)),
    ] {
        // Cut the compressed stream at several points, including right
        // before the trailer (gzip CRC/size, zstd checksum/last block).
        for cut in [blob.len() / 3, blob.len() - 8, blob.len() - 1] {
            let sb = Sandbox::new();
            let err = sb
                .unpack(vec![(L1, c, blob[..cut].to_vec())])
                .await
                .expect_err("truncated stream");
            assert!(
                matches!(err, UnpackError::Truncated { .. }),
                "{c:?} cut at {cut}/{}: {err:?}",
                blob.len()
            );
            assert_eq!(err.layer(), Some(L1));
            sb.assert_outside_untouched();
        }
    }
}

#[tokio::test]
async fn corrupt_compressed_stream_is_a_decompression_error() {
    let tar = LayerBuilder::new().file("a", vec![5u8; 100_000]).tar();
    let mut blob = gzip(&tar);
    let n = blob.len();
    blob[n - 6] ^= 0xff; // inside the CRC32 / ISIZE trailer
    let sb = Sandbox::new();
    let err = sb
        .unpack(vec![(L1, Compression::Gzip, blob)])
        .await
        .expect_err("corrupt");
    assert!(matches!(err, UnpackError::Decompress { .. }), "{err:?}");
    assert_eq!(err.layer(), Some(L1));
    sb.assert_outside_untouched();
}

#[tokio::test]
async fn bad_header_checksum_and_sparse_members_are_refused() {
    let mut tar = LayerBuilder::new().file("a", "a").tar();
    tar[0] = b'b'; // name changes, checksum does not
    let sb = Sandbox::new();
    let err = sb
        .unpack(vec![(L1, Compression::None, tar)])
        .await
        .expect_err("checksum");
    assert!(matches!(err, UnpackError::MalformedTar { .. }), "{err:?}");
    assert_eq!(err.layer(), Some(L1));

    let tar = LayerBuilder::new()
        .entry(Entry::new(b'S', "sparse").data("x"))
        .tar();
    let sb = Sandbox::new();
    let err = sb
        .unpack(vec![(L1, Compression::None, tar)])
        .await
        .expect_err("sparse");
    assert!(
        matches!(err, UnpackError::UnsupportedEntry { .. }),
        "{err:?}"
    );
    assert_names(&err, L1, "sparse");
    sb.assert_outside_untouched();
}
