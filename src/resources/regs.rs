//! CPU state: general registers and the XSAVE area. Dumped through ptrace,
//! restored by the restorer's rt_sigreturn through a frame built here.

use anyhow::{Result, bail};
use tracing::info;

use crate::abi::{self, RtSigFrame, SigContext, StackT, UContext};
use crate::images::pb::{GpRegs, SigAltStack};
use crate::seize::Regs;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

const NR_RESTART_SYSCALL: u64 = 219;

/// Who the registers are for: the live task (crust lets it run on after a
/// dump or a failure) or the image (a new task on restore).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ResumeIn {
    Live,
    Image,
}

/// Registers as the task must resume after a ptrace stop: a syscall the
/// freeze interrupted is set up to run again, as the kernel would do on the
/// way back to user space, and orig_rax is cleared so that the kernel does
/// not do it a second time. Returns the registers and whether a syscall
/// restarts.
pub fn resume_regs(pid: i32, r: &Regs, for_: ResumeIn) -> (Regs, bool) {
    let mut g = *r;
    let mut restarted = false;
    if (r.orig_rax as i64) >= 0 {
        match -(r.rax as i64) {
            // The image keeps these as they are: the restored task is
            // released inside the kernel's signal code with orig_rax back
            // (see `restore::finish_tree`), and the kernel itself restarts
            // the syscall or returns EINTR into a handler.
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND if for_ == ResumeIn::Image => {
                restarted = true;
            }
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                g.rax = r.orig_rax;
                g.rip -= 2;
                restarted = true;
            }
            // The live task keeps its restart block (the time left of a
            // sleep, say) and goes through restart_syscall; a restored task
            // has none, so it runs the syscall again from its arguments.
            ERESTART_RESTARTBLOCK => {
                g.rax = match for_ {
                    ResumeIn::Live => NR_RESTART_SYSCALL,
                    ResumeIn::Image => {
                        info!(
                            "task {pid} will run its interrupted syscall {} again",
                            r.orig_rax
                        );
                        r.orig_rax
                    }
                };
                g.rip -= 2;
                restarted = true;
            }
            _ => {}
        }
    }
    if !(for_ == ResumeIn::Image && restarted && g.rax as i64 != g.orig_rax as i64) {
        g.orig_rax = u64::MAX;
    }
    (g, restarted)
}

pub fn to_pb(r: &Regs) -> GpRegs {
    GpRegs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

/// Size of the area `build_sigframe` fills: frame, alignment and XSAVE area.
pub fn sigframe_size(xsave_len: usize) -> usize {
    std::mem::size_of::<RtSigFrame>() + 64 + xsave_len + 4 + 64
}

/// Builds the rt_sigframe the restorer returns through, at `buf`, which will
/// live at address `addr` in the restored task. Returns the offset of the
/// frame (its `pretcode` slot) within `buf`.
pub fn build_sigframe(
    buf: &mut [u8],
    addr: u64,
    g: &GpRegs,
    xsave: &[u8],
    sigmask: u64,
    altstack: Option<&SigAltStack>,
) -> Result<usize> {
    if xsave.len() < 576 {
        bail!(
            "the XSAVE area in the images is {} bytes, too short; the core image is corrupt",
            xsave.len()
        );
    }
    // The frame at 16n + 8 (as after a call), the XSAVE area 64-byte aligned after it.
    let frame_off = ((addr + 15) & !15) + 8 - addr;
    let fp_addr = (addr + frame_off + std::mem::size_of::<RtSigFrame>() as u64 + 63) & !63;
    let fp_off = (fp_addr - addr) as usize;
    if fp_off + xsave.len() + 4 > buf.len() {
        bail!("sigframe area too small");
    }
    buf[fp_off..fp_off + xsave.len()].copy_from_slice(xsave);
    // The software-reserved bytes tell the kernel the frame carries XSAVE state.
    let sw = fp_off + abi::FXSAVE_SW_RESERVED_OFF;
    let xfeatures = u64::from_le_bytes(xsave[512..520].try_into().unwrap());
    let supported = u64::from_le_bytes(buf[sw + 8..sw + 16].try_into().unwrap());
    buf[sw..sw + 4].copy_from_slice(&abi::FP_XSTATE_MAGIC1.to_le_bytes());
    buf[sw + 4..sw + 8].copy_from_slice(&((xsave.len() + 4) as u32).to_le_bytes());
    let feat = if supported != 0 {
        supported
    } else {
        xfeatures | 3
    };
    buf[sw + 8..sw + 16].copy_from_slice(&feat.to_le_bytes());
    buf[sw + 16..sw + 20].copy_from_slice(&(xsave.len() as u32).to_le_bytes());
    buf[fp_off + xsave.len()..fp_off + xsave.len() + 4]
        .copy_from_slice(&abi::FP_XSTATE_MAGIC2.to_le_bytes());

    let frame = RtSigFrame {
        pretcode: 0,
        uc: UContext {
            uc_flags: abi::UC_FP_XSTATE | abi::UC_SIGCONTEXT_SS | abi::UC_STRICT_RESTORE_SS,
            uc_link: 0,
            uc_stack: altstack
                .map(|a| StackT {
                    ss_sp: a.sp,
                    ss_flags: a.flags,
                    _pad: 0,
                    ss_size: a.size,
                })
                .unwrap_or(StackT {
                    ss_sp: 0,
                    ss_flags: libc::SS_DISABLE,
                    _pad: 0,
                    ss_size: 0,
                }),
            uc_mcontext: SigContext {
                r8: g.r8,
                r9: g.r9,
                r10: g.r10,
                r11: g.r11,
                r12: g.r12,
                r13: g.r13,
                r14: g.r14,
                r15: g.r15,
                rdi: g.rdi,
                rsi: g.rsi,
                rbp: g.rbp,
                rbx: g.rbx,
                rdx: g.rdx,
                rax: g.rax,
                rcx: g.rcx,
                rsp: g.rsp,
                rip: g.rip,
                eflags: g.eflags,
                cs: g.cs as u16,
                gs: 0,
                fs: 0,
                ss: g.ss as u16,
                fpstate: fp_addr,
                ..Default::default()
            },
            uc_sigmask: sigmask,
        },
        info: [0; 16],
    };
    let fo = frame_off as usize;
    // SAFETY: RtSigFrame is plain repr(C) data; the bounds were checked above.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &frame as *const RtSigFrame as *const u8,
            std::mem::size_of::<RtSigFrame>(),
        )
    };
    buf[fo..fo + bytes.len()].copy_from_slice(bytes);
    Ok(fo)
}
