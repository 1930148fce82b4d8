//! TCP_NODELAY on the database's sockets.
//!
//! sqlx 0.9.0 stopped setting TCP_NODELAY on its sockets (sqlx issue 4335,
//! fixed upstream, not yet released). Over TLS a statement larger than one
//! record goes out as two writes, and Nagle's algorithm holds the second one
//! until the server acknowledges the first: about 40 ms per statement, which
//! made bulk writes over TLS six times slower than plaintext. sqlx offers no
//! hook to the socket, so after each new connection the process's TCP
//! sockets get the option (setting it again, or on a socket that has it,
//! changes nothing). Remove this module once a fixed sqlx is released.

/// Sets TCP_NODELAY on every TCP socket of this process; returns how many
/// took it. Linux only (elsewhere: 0, nothing done).
pub fn set_on_tcp_sockets() -> usize {
    #[cfg(target_os = "linux")]
    {
        linux::set_all()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux {
    pub(super) fn set_all() -> usize {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return 0;
        };
        let mut done = 0;
        for entry in dir.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::c_int>().ok())
            else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads exactly size_of::<c_int>() bytes from
            // a pointer to a live local. The descriptor is a plain integer
            // the kernel checks: one closed or reused since it was listed
            // yields EBADF/ENOTSOCK/ENOPROTOOPT (ignored), or sets
            // TCP_NODELAY on another TCP socket of ours, which is harmless.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&raw const one).cast::<libc::c_void>(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                done += 1;
            }
        }
        done
    }
}
