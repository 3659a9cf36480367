//! CRC-32 as zlib and crc32fast compute it (IEEE 802.3 polynomial,
//! reflected, inverted before and after), for the parasite: it checksums the
//! pages it hands to crust, so that crust never reads the pages image back.
//! Compiled into the parasite blob and into crust, whose tests hold it to
//! crc32fast.
//!
//! With PCLMULQDQ (every x86-64 CPU since 2010) the data is folded 64 bytes
//! at a time by carry-less multiplication (Intel's "Fast CRC Computation for
//! Generic Polynomials Using PCLMULQDQ Instruction"); without it, and for
//! the last bytes, one table lookup per byte.

#![allow(dead_code)]

use core::arch::x86_64::*;

const POLY: u32 = 0xedb8_8320;

const fn make_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { POLY ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static TABLE: [u32; 256] = make_table();

/// The running state: the CRC register, not inverted.
fn bytewise(mut state: u32, data: &[u8]) -> u32 {
    for &b in data {
        state = TABLE[((state ^ b as u32) & 0xff) as usize] ^ (state >> 8);
    }
    state
}

/// The paper's constants for the reflected polynomial: powers of x modulo
/// P for folding across 512 bits (K1, K2), 128 bits (K3, K4) and 64 bits
/// (K5), then P itself and its Barrett quotient for the last reduction.
const K1: i64 = 0x1_5444_2bd4;
const K2: i64 = 0x1_c6e4_1596;
const K3: i64 = 0x1_7519_97d0;
const K4: i64 = 0x0_ccaa_009e;
const K5: i64 = 0x1_63cd_6124;
const P_X: i64 = 0x1_db71_0641;
const U_PRIME: i64 = 0x1_f701_1641;

/// Folds `data` (at least 64 bytes, a multiple of 16) into the state.
///
/// # Safety
/// The CPU must have PCLMULQDQ.
#[target_feature(enable = "pclmulqdq")]
unsafe fn folded(state: u32, data: &[u8]) -> u32 {
    debug_assert!(data.len() >= 64 && data.len().is_multiple_of(16));
    let p = data.as_ptr() as *const __m128i;
    let n = data.len() / 16;
    // SAFETY: every load reads 16 bytes inside `data` (index < n).
    unsafe {
        let ld = |i: usize| _mm_loadu_si128(p.add(i));
        let mut x1 = _mm_xor_si128(ld(0), _mm_cvtsi32_si128(state as i32));
        let mut x2 = ld(1);
        let mut x3 = ld(2);
        let mut x4 = ld(3);
        let mut i = 4;
        // Four lanes folded 64 bytes ahead, while 64 more bytes remain.
        let k12 = _mm_set_epi64x(K2, K1);
        while i + 4 <= n {
            x1 = fold(x1, k12, ld(i));
            x2 = fold(x2, k12, ld(i + 1));
            x3 = fold(x3, k12, ld(i + 2));
            x4 = fold(x4, k12, ld(i + 3));
            i += 4;
        }
        // The four lanes into one, then the remaining 16-byte blocks.
        let k34 = _mm_set_epi64x(K4, K3);
        x1 = fold(x1, k34, x2);
        x1 = fold(x1, k34, x3);
        x1 = fold(x1, k34, x4);
        while i < n {
            x1 = fold(x1, k34, ld(i));
            i += 1;
        }
        // 128 bits to 64 (appending the 32 zero bits a CRC implies).
        let t = _mm_clmulepi64_si128(x1, k34, 0x10);
        x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), t);
        // 64 bits to 32.
        let mask32 = _mm_set_epi32(0, 0, 0, -1);
        let hi = _mm_srli_si128(x1, 4);
        x1 = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), _mm_set_epi64x(0, K5), 0x00);
        x1 = _mm_xor_si128(x1, hi);
        // Barrett reduction to the 32-bit remainder.
        let pu = _mm_set_epi64x(U_PRIME, P_X);
        let t = _mm_clmulepi64_si128(_mm_and_si128(x1, mask32), pu, 0x10);
        let t = _mm_clmulepi64_si128(_mm_and_si128(t, mask32), pu, 0x00);
        x1 = _mm_xor_si128(x1, t);
        _mm_cvtsi128_si32(_mm_srli_si128(x1, 4)) as u32
    }
}

/// One lane `x` folded over a distance given by the constants in `k`, onto `next`.
#[inline]
#[target_feature(enable = "pclmulqdq")]
fn fold(x: __m128i, k: __m128i, next: __m128i) -> __m128i {
    let lo = _mm_clmulepi64_si128(x, k, 0x00);
    let hi = _mm_clmulepi64_si128(x, k, 0x11);
    _mm_xor_si128(_mm_xor_si128(lo, hi), next)
}

fn have_pclmulqdq() -> bool {
    // CPUID leaf 1, ECX bit 1.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 1 exists on every x86-64 CPU.
    let ecx = unsafe { __cpuid(1) }.ecx;
    ecx & (1 << 1) != 0
}

/// A CRC-32 in progress.
#[derive(Clone, Copy)]
pub struct Crc32 {
    state: u32,
    clmul: bool,
}

impl Crc32 {
    pub fn new() -> Self {
        Crc32 {
            state: !0,
            clmul: have_pclmulqdq(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut data = data;
        if self.clmul && data.len() >= 64 {
            let bulk = data.len() & !15;
            // SAFETY: the CPU has PCLMULQDQ (checked in `new`).
            self.state = unsafe { folded(self.state, &data[..bulk]) };
            data = &data[bulk..];
        }
        self.state = bytewise(self.state, data);
    }

    pub fn finish(&self) -> u32 {
        !self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_crc32fast_at_every_length_and_offset() {
        let data: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for off in [0, 1, 7, 16, 33] {
            for len in (0..700).chain([4095, 4096, 4097, 8192, 12_288, 19_000]) {
                let d = &data[off..off + len];
                let mut c = Crc32::new();
                c.update(d);
                assert_eq!(c.finish(), crc32fast::hash(d), "offset {off} length {len}");
            }
        }
    }

    #[test]
    fn table_and_folding_agree_in_pieces() {
        let data: Vec<u8> = (0..65_536u32).map(|i| (i * 31 + i / 7) as u8).collect();
        let mut whole = Crc32::new();
        whole.update(&data);
        // In uneven pieces, and with the folding turned off.
        let mut pieces = Crc32::new();
        let mut bytes = Crc32::new();
        bytes.clmul = false;
        for chunk in data.chunks(4093) {
            pieces.update(chunk);
            bytes.update(chunk);
        }
        assert_eq!(whole.finish(), crc32fast::hash(&data));
        assert_eq!(pieces.finish(), whole.finish());
        assert_eq!(bytes.finish(), whole.finish());
    }
}
