//! Servers the handle starts itself: `connect_command` (the server on the
//! socket's other end as stdin/stdout) and systemd socket activation (the
//! server inherits a listening socket as fd 3).

use crate::error::{CError, CResult};
use std::ffi::{c_char, CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};

/// The child's argv from a NULL-terminated C array.
///
/// # Safety
/// `argv` is NULL or a NULL-terminated array of C strings.
pub unsafe fn argv_from_c(argv: *mut *mut c_char) -> CResult<Vec<CString>> {
    if argv.is_null() {
        return Err(CError::new(libc::EFAULT, "argv cannot be NULL"));
    }
    let mut out = Vec::new();
    let mut p = argv;
    // SAFETY: per the function's contract, every element up to the NULL
    // terminator is a valid C string.
    unsafe {
        while !(*p).is_null() {
            out.push(CStr::from_ptr(*p).to_owned());
            p = p.add(1);
        }
    }
    if out.is_empty() {
        return Err(CError::new(libc::EINVAL, "argv must have at least one element"));
    }
    Ok(out)
}

fn os_str(c: &CString) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(c.as_bytes())
}

/// Starts `argv` with one end of a socketpair as its stdin and stdout;
/// returns our end and the child.
pub fn spawn_command(argv: &[CString]) -> CResult<(OwnedFd, Child)> {
    let (ours, theirs) = UnixStream::pair()?;
    let theirs_out = theirs.try_clone()?;
    // std spawns with fork/exec (or posix_spawn): nothing but
    // async-signal-safe work happens in the child.
    let child = Command::new(os_str(&argv[0]))
        .args(argv[1..].iter().map(os_str))
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::from(OwnedFd::from(theirs_out)))
        .spawn()
        .map_err(|e| {
            CError::new(e.raw_os_error().unwrap_or(libc::EIO), format!("{}: {e}", argv[0].to_string_lossy()))
        })?;
    Ok((OwnedFd::from(ours), child))
}

/// Starts `argv` under systemd socket activation and connects to it; the
/// socket's name (`LISTEN_FDNAMES`) is `fdname`, or "unknown" if empty.
/// Returns the connected socket, the child's pid and the scratch
/// directory holding the socket.
pub fn spawn_activated(argv: &[CString], fdname: &str) -> CResult<(OwnedFd, libc::pid_t, std::path::PathBuf)> {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("libnbd-sa-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path)?;

    // Everything the child needs is prepared here: after fork it only
    // formats its pid into a buffer, dup2s and execs.
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !matches!(k.to_str(), Some("LISTEN_PID" | "LISTEN_FDS" | "LISTEN_FDNAMES")))
        .filter_map(|(k, v)| {
            use std::os::unix::ffi::OsStrExt;
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            CString::new(b).ok()
        })
        .collect();
    env.push(CString::new("LISTEN_FDS=1").unwrap_or_default());
    let fdname = if fdname.is_empty() { "unknown" } else { fdname };
    env.push(CString::new(format!("LISTEN_FDNAMES={fdname}")).unwrap_or_default());
    let mut pid_var = *b"LISTEN_PID=00000000000000000000\0";
    let mut envp: Vec<*const c_char> = env.iter().map(|c| c.as_ptr()).collect();
    envp.push(pid_var.as_ptr().cast());
    envp.push(std::ptr::null());
    let argvp: Vec<*const c_char> = argv.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect();
    let lfd = listener.as_raw_fd();

    // SAFETY: fork(2); the child below calls only async-signal-safe
    // functions (getpid, dup2, fcntl, execvpe, _exit) on memory prepared
    // before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        // SAFETY: in the child, on buffers prepared above.
        unsafe {
            let mut v = libc::getpid() as u64;
            let digits = &mut pid_var[11..31];
            let mut i = digits.len();
            loop {
                i -= 1;
                digits[i] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            // Shift the digits left so the value has no leading zeroes.
            let len = digits.len() - i;
            digits.copy_within(i.., 0);
            digits[len] = 0;
            if lfd != 3 {
                libc::dup2(lfd, 3);
            } else {
                libc::fcntl(3, libc::F_SETFD, 0);
            }
            libc::execvpe(argvp[0], argvp.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    drop(listener);
    let sock = UnixStream::connect(&path)?;
    // SAFETY: turning a std socket into an OwnedFd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(sock)) };
    Ok((fd, pid, dir))
}
