//! Action scripts (`--action-script PATH`, repeatable): run at the stages
//! CRIU documents, with CRIU's environment, so that hooks written for criu
//! work unchanged. A script that fails aborts its stage the way any failure
//! there would: a dump resumes the tree unharmed, a restore kills what it
//! made. pre-resume must not fail (the tree is about to run) and post-resume
//! comes when it already runs: their failures are reported, not undone.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

/// How long one script may run: a post-dump script may copy the images to
/// another host, which can take a while.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The stages a script is run at (CRTOOLS_SCRIPT_ACTION).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    PreDump,
    PostDump,
    PreRestore,
    PostRestore,
    PreResume,
    PostResume,
    /// Around a dump and restore of a tree with a network namespace of its
    /// own, as criu runs them.
    NetworkLock,
    NetworkUnlock,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::PreDump => "pre-dump",
            Self::PostDump => "post-dump",
            Self::PreRestore => "pre-restore",
            Self::PostRestore => "post-restore",
            Self::PreResume => "pre-resume",
            Self::PostResume => "post-resume",
            Self::NetworkLock => "network-lock",
            Self::NetworkUnlock => "network-unlock",
        }
    }
}

/// The scripts of one run of crust and what they are told.
pub struct Actions {
    scripts: Vec<PathBuf>,
    image_dir: PathBuf,
    init_pid: std::cell::Cell<i32>,
}

impl Actions {
    pub fn new(scripts: &[PathBuf], image_dir: &std::path::Path) -> Self {
        Actions {
            scripts: scripts.to_vec(),
            image_dir: std::path::absolute(image_dir).unwrap_or_else(|_| image_dir.to_owned()),
            init_pid: std::cell::Cell::new(0),
        }
    }

    /// No scripts: every stage passes.
    pub fn none() -> Self {
        Self::new(&[], std::path::Path::new("."))
    }

    /// The root task's PID (CRTOOLS_INIT_PID), once known.
    pub fn set_init_pid(&self, pid: i32) {
        self.init_pid.set(pid);
    }

    /// Runs every script for `action`, in order; the first that fails (a
    /// non-zero exit, a signal, or no end within an hour) is the error.
    pub fn run(&self, action: Action) -> Result<()> {
        for s in &self.scripts {
            run_script(s, action, &self.image_dir, self.init_pid.get())?;
        }
        Ok(())
    }
}

fn run_script(script: &PathBuf, action: Action, image_dir: &PathBuf, init_pid: i32) -> Result<()> {
    let mut cmd = std::process::Command::new(script);
    cmd.env("CRTOOLS_SCRIPT_ACTION", action.name())
        .env("CRTOOLS_IMAGE_DIR", image_dir)
        .stdin(std::process::Stdio::null());
    if init_pid > 0 {
        cmd.env("CRTOOLS_INIT_PID", init_pid.to_string());
    }
    // SAFETY: only async-signal-safe calls between fork and exec: the
    // script starts with no signal blocked (crust blocks SIGCHLD).
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "running the {} action script {}",
            action.name(),
            script.display()
        )
    })?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    tracing::info!("action script {} for {}", script.display(), action.name());
    let status = crate::sys::wait_child(
        Some(pid),
        nix::sys::wait::WaitPidFlag::empty(),
        SCRIPT_TIMEOUT,
    )
    .with_context(|| format!("waiting for the action script {}", script.display()))?;
    use nix::sys::wait::WaitStatus;
    match status {
        Some(WaitStatus::Exited(_, 0)) => Ok(()),
        Some(WaitStatus::Exited(_, code)) => crate::refuse!(
            "the {} action script {} exited with status {code}",
            action.name(),
            script.display()
        ),
        Some(WaitStatus::Signaled(_, sig, _)) => crate::refuse!(
            "the {} action script {} was killed by {sig:?}",
            action.name(),
            script.display()
        ),
        Some(other) => anyhow::bail!(
            "the {} action script {} ended oddly: {other:?}",
            action.name(),
            script.display()
        ),
        None => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            crate::refuse!(
                "the {} action script {} did not end within {} s and was killed",
                action.name(),
                script.display(),
                SCRIPT_TIMEOUT.as_secs()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_see_their_stage_and_fail_their_stage() {
        crate::sys::block_sigchld();
        let dir = std::env::temp_dir().join(format!("crust-actions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("seen");
        let script = dir.join("hook.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$CRTOOLS_SCRIPT_ACTION $CRTOOLS_IMAGE_DIR $CRTOOLS_INIT_PID\" >> {}\n[ \"$CRTOOLS_SCRIPT_ACTION\" != post-dump ]\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let a = Actions::new(std::slice::from_ref(&script), &dir);
        a.set_init_pid(42);
        a.run(Action::PreDump).unwrap();
        let e = a.run(Action::PostDump).unwrap_err();
        assert!(e.to_string().contains("post-dump action script"), "{e}");
        assert_eq!(crate::error::class_of(&e), crate::error::Class::Refused);
        let seen = std::fs::read_to_string(&out).unwrap();
        let want = format!(
            "pre-dump {} 42\npost-dump {} 42\n",
            dir.display(),
            dir.display()
        );
        assert_eq!(seen, want);
        assert!(Actions::none().run(Action::PostDump).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
