//! The freestanding runtime shared by the parasite and the restorer blobs:
//! raw system calls and the memory intrinsics LLVM may call. No libc exists
//! where these blobs run.

#![allow(dead_code)]

use core::arch::asm;

pub const SYS_READ: u64 = 0;
pub const SYS_WRITE: u64 = 1;
pub const SYS_CLOSE: u64 = 3;
pub const SYS_MMAP: u64 = 9;
pub const SYS_MPROTECT: u64 = 10;
pub const SYS_BRK: u64 = 12;
pub const SYS_MUNMAP: u64 = 11;
pub const SYS_RT_SIGACTION: u64 = 13;
pub const SYS_GETITIMER: u64 = 36;
pub const SYS_SETITIMER: u64 = 38;
pub const SYS_MREMAP: u64 = 25;
pub const SYS_FCNTL: u64 = 72;
pub const SYS_IOCTL: u64 = 16;
pub const SYS_SETRESUID: u64 = 117;
pub const SYS_SETRESGID: u64 = 119;
pub const SYS_SETFSUID: u64 = 122;
pub const SYS_SETFSGID: u64 = 123;
pub const SYS_CAPSET: u64 = 126;
pub const SYS_SIGALTSTACK: u64 = 131;
pub const SYS_PRCTL: u64 = 157;
pub const SYS_ARCH_PRCTL: u64 = 158;
pub const SYS_SETGROUPS: u64 = 116;
pub const SYS_SET_TID_ADDRESS: u64 = 218;
pub const SYS_EXIT_GROUP: u64 = 231;
pub const SYS_VMSPLICE: u64 = 278;
pub const SYS_PIPE2: u64 = 293;
pub const SYS_SOCKETPAIR: u64 = 53;
pub const SYS_SENDTO: u64 = 44;
pub const SYS_RECVFROM: u64 = 45;
pub const SYS_PRLIMIT64: u64 = 302;
pub const SYS_RSEQ: u64 = 334;
pub const SYS_FUTEX: u64 = 202;
pub const SYS_SET_ROBUST_LIST: u64 = 273;
pub const SYS_CLONE3: u64 = 435;
pub const SYS_GETPID: u64 = 39;
pub const SYS_NANOSLEEP: u64 = 35;
pub const SYS_GETTID: u64 = 186;
pub const SYS_RT_SIGQUEUEINFO: u64 = 129;
pub const SYS_RT_TGSIGQUEUEINFO: u64 = 297;
pub const SYS_TIMER_CREATE: u64 = 222;
pub const SYS_MADVISE: u64 = 28;
pub const SYS_SHMAT: u64 = 30;
pub const SYS_MLOCKALL: u64 = 151;
pub const SYS_SECCOMP: u64 = 317;
pub const SYS_MLOCK2: u64 = 325;
pub const SYS_MEMBARRIER: u64 = 324;
pub const SYS_TIMER_SETTIME: u64 = 223;
pub const SYS_TIMER_GETTIME: u64 = 224;
pub const SYS_TIMER_GETOVERRUN: u64 = 225;

/// # Safety
/// The caller upholds the contract of the system call it makes.
#[inline(always)]
pub unsafe fn syscall6(n: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64) -> i64 {
    let ret: i64;
    // SAFETY: the x86-64 syscall ABI: rcx and r11 are clobbered by the kernel.
    unsafe {
        asm!("syscall", inlateout("rax") n as i64 => ret, in("rdi") a1, in("rsi") a2,
             in("rdx") a3, in("r10") a4, in("r8") a5, in("r9") a6,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

#[inline(always)]
pub unsafe fn syscall4(n: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    // SAFETY: forwarded contract.
    unsafe { syscall6(n, a1, a2, a3, a4, 0, 0) }
}

#[inline(always)]
pub unsafe fn syscall2(n: u64, a1: u64, a2: u64) -> i64 {
    // SAFETY: forwarded contract.
    unsafe { syscall6(n, a1, a2, 0, 0, 0, 0) }
}

pub fn exit_group(code: i32) -> ! {
    loop {
        // SAFETY: exit_group takes no memory and does not return.
        unsafe { syscall2(SYS_EXIT_GROUP, code as u64, 0) };
    }
}

// LLVM lowers copies and fills to these symbols; nothing else provides them
// here. They are written with `rep` string instructions so that the compiler
// cannot turn their bodies back into calls to themselves.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges of n bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        // SAFETY: a forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copying backwards with the direction flag set, then clearing it.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of n bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller passes two valid ranges of n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit_group(127)
}

/// Referenced by the precompiled `core`; nothing unwinds in a blob.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
