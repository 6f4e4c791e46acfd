//! Servers the handle starts itself: `connect_command` (the server on the
//! socket's other end as stdin/stdout) and systemd socket activation (the
//! server inherits a listening socket as fd 3).

use crate::error::{CError, CResult};
use std::ffi::{c_char, CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

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

/// A server command that could not be run. libnbd's child reports the
/// exec error on its stderr and exits, and the library sees its socket
/// close; so the errno is the one that closing gives (`then_errno`: none
/// for connect_command, ECONNRESET for socket activation), and the
/// message says why the server is gone.
fn not_run(argv0: &CString, exec_errno: i32, then_errno: i32) -> CError {
    let then = if then_errno == 0 { "closed" } else { "reset" };
    CError::new(
        then_errno,
        format!(
            "{}: {}: the server command could not be run, so the connection was {then}",
            argv0.to_string_lossy(),
            crate::error::strerror(exec_errno)
        ),
    )
}

/// Starts `argv` with one end of a socketpair as its stdin and stdout;
/// returns our end and the child's pid.
pub fn spawn_command(argv: &[CString]) -> CResult<(OwnedFd, libc::pid_t)> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| CError::os("socketpair", &e))?;
    let fd = theirs.as_raw_fd();
    let pid = fork_exec(argv, &[(fd, 0), (fd, 1)], None)?.map_err(|errno| not_run(&argv[0], errno, 0))?;
    Ok((OwnedFd::from(ours), pid))
}

/// The socket a socket-activated server listens on, in its scratch directory.
pub fn activation_socket(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("sock")
}

/// Starts `argv` under systemd socket activation and connects to it; the
/// socket's name (`LISTEN_FDNAMES`) is `fdname`, or "unknown" if empty.
/// Returns the connected socket, the child's pid and the scratch
/// directory holding the socket (removed again on failure).
pub fn spawn_activated(argv: &[CString], fdname: &str) -> CResult<(OwnedFd, libc::pid_t, std::path::PathBuf)> {
    let dir = private_dir()?;
    let r = start_activated(argv, &dir, fdname);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r.map(|(fd, pid)| (fd, pid, dir))
}

/// A new directory only we can enter, with a name no one can guess, as
/// libnbd makes it: in /tmp rather than TMPDIR, so that the socket's path
/// always fits in `sun_path`. A predictable name, or accepting a directory
/// that already exists, would let another local user put their socket in
/// its place.
fn private_dir() -> CResult<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut template = *b"/tmp/libnbdXXXXXX\0";
    // SAFETY: `template` is a writable, NUL-terminated buffer ending in
    // six X's, which mkdtemp replaces in place.
    if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
        return Err(CError::os("mkdtemp", &std::io::Error::last_os_error()));
    }
    let name = template[..template.len() - 1].to_vec();
    Ok(std::path::PathBuf::from(std::ffi::OsString::from_vec(name)))
}

fn start_activated(argv: &[CString], dir: &std::path::Path, fdname: &str) -> CResult<(OwnedFd, libc::pid_t)> {
    let path = activation_socket(dir);
    let listener =
        UnixListener::bind(&path).map_err(|e| CError::os(format_args!("cannot listen on {}", path.display()), &e))?;

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
    // One raw pointer for both: the list the exec reads and the slot the
    // child fills in.
    let pid_slot: *mut [u8; 32] = &mut pid_var;
    let mut envp: Vec<*const c_char> = env.iter().map(|c| c.as_ptr()).collect();
    envp.push(pid_slot.cast_const().cast());
    envp.push(std::ptr::null());
    let lfd = listener.as_raw_fd();
    let r = fork_exec(argv, &[(lfd, 3)], Some((&envp, pid_slot)));
    drop(listener);
    let pid = r?.map_err(|errno| not_run(&argv[0], errno, libc::ECONNRESET))?;
    let sock = UnixStream::connect(&path).map_err(|e| CError::os("connect", &e))?;
    // SAFETY: turning a std socket into an OwnedFd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(sock)) };
    Ok((fd, pid))
}

/// The environment of a child that must know its own pid (socket
/// activation): the variables, ending with a `LISTEN_PID=` slot the child
/// fills in before exec.
type EnvWithPid<'a> = (&'a [*const c_char], *mut [u8; 32]);

/// Forks and execs `argv` (searching PATH), after `dup2(from, to)` for
/// each of `fds` (`from == to` keeps a descriptor open across exec) and
/// with SIGPIPE at its default, as libnbd's children start. Returns the
/// child's pid once the exec succeeded, or the exec's errno (inner `Err`,
/// the child reaped); the outer error is a pipe or fork that failed here.
/// Everything the child touches is prepared before the fork; the child
/// calls only async-signal-safe functions.
fn fork_exec(
    argv: &[CString],
    fds: &[(libc::c_int, libc::c_int)],
    env: Option<EnvWithPid>,
) -> CResult<Result<libc::pid_t, i32>> {
    let argvp: Vec<*const c_char> = argv.iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect();
    // The exec's outcome: the child writes its errno here if exec fails;
    // a successful exec closes the pipe (close-on-exec) unwritten.
    let mut status_fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array we own.
    if unsafe { libc::pipe2(status_fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(CError::last_os("pipe2"));
    }
    // SAFETY: both descriptors are fresh from pipe2 and ours alone.
    let (status_r, status_w) = unsafe { (OwnedFd::from_raw_fd(status_fds[0]), OwnedFd::from_raw_fd(status_fds[1])) };
    let status_wfd = status_w.as_raw_fd();
    let (envp, pid_var) = match env {
        Some((envp, pid_var)) => (Some(envp), Some(pid_var)),
        None => (None, None),
    };
    // SAFETY: fork(2); the child below calls only async-signal-safe
    // functions (getpid, dup2, fcntl, signal, execvp(e), write, _exit) on
    // memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(CError::last_os("fork"));
    }
    if pid == 0 {
        // SAFETY: in the child, on buffers prepared above.
        unsafe {
            if let Some(pid_var) = pid_var {
                write_pid(&mut *pid_var, libc::getpid() as u64);
            }
            for &(from, to) in fds {
                if from != to {
                    libc::dup2(from, to);
                } else {
                    libc::fcntl(to, libc::F_SETFD, 0);
                }
            }
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            match envp {
                Some(envp) => libc::execvpe(argvp[0], argvp.as_ptr(), envp.as_ptr()),
                None => libc::execvp(argvp[0], argvp.as_ptr()),
            };
            let errno = *libc::__errno_location();
            libc::write(status_wfd, (&errno as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>());
            libc::_exit(if errno == libc::ENOENT { 127 } else { 126 });
        }
    }
    drop(status_w);
    Ok(match exec_error(status_r) {
        Some(errno) => {
            let mut status = 0;
            // SAFETY: reaping our own child, which has exited or is exiting.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Err(errno)
        }
        None => Ok(pid),
    })
}

/// Writes `pid` in decimal after the `LISTEN_PID=` of `var`, NUL-terminated,
/// without allocating (it runs in a forked child).
fn write_pid(var: &mut [u8; 32], mut pid: u64) {
    let digits = &mut var[11..31];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    // Shift the digits left so the value has no leading zeroes.
    let len = digits.len() - i;
    digits.copy_within(i.., 0);
    digits[len] = 0;
}

/// The errno a child wrote to its exec-status pipe, or `None` once the
/// pipe closed unwritten (the exec succeeded).
fn exec_error(pipe: OwnedFd) -> Option<i32> {
    let mut buf = [0u8; std::mem::size_of::<libc::c_int>()];
    let mut file = std::fs::File::from(pipe);
    let mut got = 0;
    while got < buf.len() {
        match std::io::Read::read(&mut file, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    (got == buf.len()).then(|| libc::c_int::from_ne_bytes(buf))
}
