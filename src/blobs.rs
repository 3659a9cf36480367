//! The parasite and restorer blobs that build.rs compiled from `parasite/`.

/// A flat, position-independent code image.
pub struct Blob {
    pub name: &'static str,
    pub image: &'static [u8],
    /// Offset of the entry point in `image`.
    pub entry: u64,
    /// `R_X86_64_RELATIVE` relocations: (offset, addend); the slot at offset
    /// gets load address + addend.
    pub relocs: &'static [(u64, u64)],
}

include!(concat!(env!("OUT_DIR"), "/blobs.rs"));

impl Blob {
    /// Writes the image into `dst` as it must look when loaded at `base`.
    pub fn load_into(&self, dst: &mut [u8], base: u64) {
        dst[..self.image.len()].copy_from_slice(self.image);
        for &(off, addend) in self.relocs {
            let off = off as usize;
            dst[off..off + 8].copy_from_slice(&(base + addend).to_le_bytes());
        }
    }

    /// Size of the loaded image rounded up to whole pages.
    pub fn mapped_size(&self) -> u64 {
        page_align(self.image.len() as u64)
    }
}

pub fn page_align(n: u64) -> u64 {
    (n + 4095) & !4095
}
