//! Linux kernel images: tell an ELF `vmlinux` from a bzImage, read the
//! version, extract the ELF from a bzImage (for backends that need it),
//! and judge which VMM backends can boot it.
//!
//! bzImage layout (Documentation/arch/x86/boot.rst): the real-mode setup
//! header at 0x1f1 (`setup_sects`), magic `HdrS` at 0x202, the boot
//! protocol version at 0x206, a pointer to the version string at 0x20e,
//! and (protocol ≥ 2.08) `payload_offset`/`payload_length` at 0x248/0x24c
//! locating the compressed ELF inside the protected-mode part.

use std::io::Read;

/// Errors of kernel inspection.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("not a Linux kernel: neither an ELF vmlinux nor a bzImage (no `HdrS` magic)")]
    UnknownFormat,
    #[error("ELF kernel is not a 64-bit x86_64 image")]
    WrongElfArch,
    #[error("bzImage header is truncated or inconsistent: {0}")]
    BadHeader(&'static str),
    #[error(
        "bzImage boot protocol {major}.{minor:02} is too old to locate its payload (need 2.08)"
    )]
    OldProtocol { major: u8, minor: u8 },
    #[error("bzImage payload is compressed with {0}, which banger cannot decompress")]
    UnsupportedCompression(&'static str),
    #[error("decompressing the bzImage payload ({codec}) failed")]
    Decompress {
        codec: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the decompressed bzImage payload is not an ELF image")]
    PayloadNotElf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux` (what Firecracker boots).
    Elf,
    /// x86 bzImage (`vmlinuz`), what distributions ship and QEMU boots.
    BzImage,
}

impl KernelFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            KernelFormat::Elf => "elf",
            KernelFormat::BzImage => "bzimage",
        }
    }
}

/// What inspection found out about a kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelProbe {
    pub format: KernelFormat,
    /// Release string (`6.1.0-28-cloud-amd64`), when found.
    pub version: Option<String>,
    /// Compression of a bzImage's payload (`gzip`, `lz4`, `zstd`, ...).
    pub payload_compression: Option<&'static str>,
}

const ELF_MAGIC: &[u8] = b"\x7fELF";

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    d.get(off..off + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    d.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn is_bzimage(d: &[u8]) -> bool {
    d.get(0x202..0x206) == Some(b"HdrS")
}

/// Inspects a kernel image.
pub fn probe(data: &[u8]) -> Result<KernelProbe, KernelError> {
    if data.starts_with(ELF_MAGIC) {
        check_elf(data)?;
        return Ok(KernelProbe {
            format: KernelFormat::Elf,
            version: elf_version(data),
            payload_compression: None,
        });
    }
    if !is_bzimage(data) {
        return Err(KernelError::UnknownFormat);
    }
    let version = bzimage_version(data);
    let payload = bzimage_payload(data)?;
    Ok(KernelProbe {
        format: KernelFormat::BzImage,
        version,
        payload_compression: Some(compression_of(payload)),
    })
}

fn check_elf(data: &[u8]) -> Result<(), KernelError> {
    // EI_CLASS = 2 (64-bit), e_machine = 0x3e (x86_64).
    if data.get(4) != Some(&2) || u16_at(data, 18) != Some(0x3e) {
        return Err(KernelError::WrongElfArch);
    }
    Ok(())
}

fn bzimage_version(data: &[u8]) -> Option<String> {
    let ptr = u16_at(data, 0x20e)? as usize;
    if ptr == 0 {
        return None;
    }
    let start = 0x200 + ptr;
    let bytes = data.get(start..(start + 256).min(data.len()))?;
    let end = bytes.iter().position(|&b| b == 0 || b == b' ')?;
    let version = std::str::from_utf8(&bytes[..end]).ok()?;
    (!version.is_empty()).then(|| version.to_string())
}

fn elf_version(data: &[u8]) -> Option<String> {
    let needle = b"Linux version ";
    let pos = data.windows(needle.len()).position(|w| w == needle)?;
    let rest = &data[pos + needle.len()..(pos + needle.len() + 128).min(data.len())];
    let end = rest.iter().position(|&b| b == b' ' || b == 0)?;
    std::str::from_utf8(&rest[..end]).ok().map(str::to_string)
}

fn bzimage_payload(data: &[u8]) -> Result<&[u8], KernelError> {
    let protocol = u16_at(data, 0x206).ok_or(KernelError::BadHeader("no protocol version"))?;
    if protocol < 0x0208 {
        return Err(KernelError::OldProtocol {
            major: (protocol >> 8) as u8,
            minor: protocol as u8,
        });
    }
    let setup_sects = match *data
        .get(0x1f1)
        .ok_or(KernelError::BadHeader("no setup_sects"))?
    {
        0 => 4,
        n => n as usize,
    };
    let offset = u32_at(data, 0x248).ok_or(KernelError::BadHeader("no payload_offset"))? as usize;
    let length = u32_at(data, 0x24c).ok_or(KernelError::BadHeader("no payload_length"))? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    data.get(
        start
            ..start
                .checked_add(length)
                .ok_or(KernelError::BadHeader("payload overflows"))?,
    )
    .ok_or(KernelError::BadHeader("payload lies outside the file"))
}

fn compression_of(payload: &[u8]) -> &'static str {
    match payload {
        [0x1f, 0x8b, ..] => "gzip",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => "xz",
        [b'B', b'Z', b'h', ..] => "bzip2",
        [0x5d, 0x00, 0x00, ..] => "lzma",
        [0x89, b'L', b'Z', b'O', ..] => "lzo",
        p if p.starts_with(ELF_MAGIC) => "none",
        _ => "unknown",
    }
}

/// Extracts the ELF `vmlinux` from a bzImage (or returns an ELF input
/// unchanged).
pub fn extract_elf(data: &[u8]) -> Result<Vec<u8>, KernelError> {
    if data.starts_with(ELF_MAGIC) {
        check_elf(data)?;
        return Ok(data.to_vec());
    }
    if !is_bzimage(data) {
        return Err(KernelError::UnknownFormat);
    }
    let payload = bzimage_payload(data)?;
    let codec = compression_of(payload);
    let elf = match codec {
        "none" => payload.to_vec(),
        "gzip" => {
            let mut out = Vec::new();
            // The kernel appends the uncompressed size after the gzip member;
            // a single-member decoder stops before it.
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|source| KernelError::Decompress { codec, source })?;
            out
        }
        "zstd" => {
            let mut out = Vec::new();
            // Trailing size bytes follow the frame; decode the first frame only.
            let mut decoder = zstd::stream::read::Decoder::new(payload)
                .map_err(|source| KernelError::Decompress { codec, source })?
                .single_frame();
            decoder
                .read_to_end(&mut out)
                .map_err(|source| KernelError::Decompress { codec, source })?;
            out
        }
        "lz4" => lz4_legacy(payload).map_err(|source| KernelError::Decompress { codec, source })?,
        other => return Err(KernelError::UnsupportedCompression(other)),
    };
    if !elf.starts_with(ELF_MAGIC) {
        return Err(KernelError::PayloadNotElf);
    }
    check_elf(&elf)?;
    Ok(elf)
}

/// The legacy LZ4 format the kernel uses (`lz4 -l`): a magic number, then
/// blocks of at most 8 MiB, each prefixed with its compressed size; the
/// kernel's build appends the uncompressed size as a final `u32`.
fn lz4_legacy(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK_MAX: usize = 8 << 20;
    let bad = |msg: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string());
    let mut pos = 0;
    let mut out = Vec::new();
    while pos + 4 <= payload.len() {
        let word = u32_at(payload, pos).ok_or_else(|| bad("truncated"))?;
        pos += 4;
        if word == MAGIC {
            continue;
        }
        let size = word as usize;
        let Some(block) = payload.get(pos..pos + size) else {
            // The trailing uncompressed-size word, not a block.
            break;
        };
        let decoded =
            lz4_flex::block::decompress(block, BLOCK_MAX).map_err(|e| bad(&e.to_string()))?;
        out.extend_from_slice(&decoded);
        pos += size;
    }
    if out.is_empty() {
        return Err(bad("no lz4 blocks"));
    }
    Ok(out)
}

/// Whether an ELF kernel has what Firecracker needs built in: virtio-mmio
/// devices described on the command line and ext4. Modules do not count:
/// Firecracker boots without an initrd. This reads the image's strings
/// (built-in drivers carry their names and messages; modular ones live in
/// `.ko` files), so it is a heuristic, conservative in what it accepts.
pub fn firecracker_compatible(elf: &[u8]) -> bool {
    let has = |needle: &[u8]| elf.windows(needle.len()).any(|w| w == needle);
    elf.starts_with(ELF_MAGIC)
        && has(b"virtio-mmio")
        && has(b"virtio_mmio.device")
        && has(b"EXT4-fs")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF64 x86_64 header followed by `body`.
    fn elf(body: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(ELF_MAGIC);
        e[4] = 2;
        e[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
        e.extend_from_slice(body);
        e
    }

    /// A synthetic bzImage around `payload`, with a version string.
    fn bzimage(payload: &[u8], version: &str) -> Vec<u8> {
        let setup_sects = 4usize;
        let mut d = vec![0u8; (setup_sects + 1) * 512];
        d[0x1f1] = setup_sects as u8;
        d[0x202..0x206].copy_from_slice(b"HdrS");
        d[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        // Version string placed at 0x200 + 0x300.
        d[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = format!("{version} (builder@host) #1 SMP\0");
        d[0x500..0x500 + v.len()].copy_from_slice(v.as_bytes());
        let offset = 64usize;
        d[0x248..0x24c].copy_from_slice(&(offset as u32).to_le_bytes());
        d[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        d.extend(std::iter::repeat_n(0u8, offset));
        d.extend_from_slice(payload);
        d.extend_from_slice(&[0xaa; 16]);
        d
    }

    fn with_size_trailer(mut compressed: Vec<u8>, raw_len: usize) -> Vec<u8> {
        compressed.extend_from_slice(&(raw_len as u32).to_le_bytes());
        compressed
    }

    #[test]
    fn elf_is_recognised_with_version() {
        let k = elf(b"....Linux version 6.9.1-test (x@y) #1....");
        let p = probe(&k).expect("probe");
        assert_eq!(p.format, KernelFormat::Elf);
        assert_eq!(p.version.as_deref(), Some("6.9.1-test"));
        assert_eq!(extract_elf(&k).expect("extract"), k);
    }

    #[test]
    fn non_x86_elf_is_refused() {
        let mut k = elf(b"x");
        k[18] = 0xb7; // aarch64
        assert!(matches!(probe(&k), Err(KernelError::WrongElfArch)));
    }

    #[test]
    fn garbage_is_unknown_format() {
        assert!(matches!(
            probe(&[0u8; 4096]),
            Err(KernelError::UnknownFormat)
        ));
        assert!(matches!(probe(b"short"), Err(KernelError::UnknownFormat)));
    }

    #[test]
    fn gzip_bzimage_yields_its_elf() {
        let inner = elf(&vec![7u8; 100_000]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&inner).expect("gz");
        let payload = with_size_trailer(gz.finish().expect("gz"), inner.len());
        let bz = bzimage(&payload, "6.1.0-9-test");
        let p = probe(&bz).expect("probe");
        assert_eq!(p.format, KernelFormat::BzImage);
        assert_eq!(p.version.as_deref(), Some("6.1.0-9-test"));
        assert_eq!(p.payload_compression, Some("gzip"));
        assert_eq!(extract_elf(&bz).expect("extract"), inner);
    }

    #[test]
    fn zstd_bzimage_yields_its_elf() {
        let inner = elf(&vec![3u8; 50_000]);
        let z = zstd::encode_all(&inner[..], 3).expect("zstd");
        let bz = bzimage(&with_size_trailer(z, inner.len()), "6.12.0");
        assert_eq!(extract_elf(&bz).expect("extract"), inner);
    }

    #[test]
    fn lz4_legacy_bzimage_yields_its_elf() {
        let inner = elf(&(0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let mut payload = 0x184c_2102u32.to_le_bytes().to_vec();
        for chunk in inner.chunks(70_000) {
            let block = lz4_flex::block::compress(chunk);
            payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
            payload.extend_from_slice(&block);
        }
        let bz = bzimage(&with_size_trailer(payload, inner.len()), "6.1.0-lz4");
        assert_eq!(probe(&bz).expect("probe").payload_compression, Some("lz4"));
        assert_eq!(extract_elf(&bz).expect("extract"), inner);
    }

    #[test]
    fn xz_payload_is_a_clear_unsupported_error() {
        let bz = bzimage(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2, 3], "x");
        let err = extract_elf(&bz).expect_err("xz unsupported");
        assert!(err.to_string().contains("xz"), "{err}");
    }

    #[test]
    fn payload_outside_file_is_bad_header() {
        let mut bz = bzimage(b"abc", "x");
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(probe(&bz), Err(KernelError::BadHeader(_))));
    }

    #[test]
    fn firecracker_needs_builtin_virtio_mmio_and_ext4() {
        let good = elf(b"..virtio-mmio..virtio_mmio.device=..EXT4-fs (%s): mounted..");
        assert!(firecracker_compatible(&good));
        let modular = elf(b"..EXT4-fs..");
        assert!(!firecracker_compatible(&modular));
    }

    /// The distribution kernel installed on this machine (CI installs
    /// Debian's cloud kernel): a real lz4 bzImage whose ELF must come out.
    #[test]
    fn real_debian_kernel_extracts() {
        let boot = std::fs::read_dir("/boot")
            .expect("/boot exists (apt-get install linux-image-cloud-amd64)");
        let vmlinuz = boot
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .expect("a /boot/vmlinuz-* (apt-get install linux-image-cloud-amd64)");
        let data = std::fs::read(&vmlinuz).expect("read kernel");
        let p = probe(&data).expect("probe");
        assert_eq!(p.format, KernelFormat::BzImage);
        let name = vmlinuz
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        assert_eq!(p.version.as_deref(), name.strip_prefix("vmlinuz-"));
        let elf = extract_elf(&data).expect("extract ELF");
        assert!(
            elf.len() > data.len(),
            "ELF should be larger than the compressed image"
        );
        assert_eq!(elf_version(&elf), p.version);
        // Debian builds virtio as modules: not a Firecracker kernel.
        assert!(!firecracker_compatible(&elf));
    }
}
