//! splice(2) through a pipe: a direction's bytes go from one TCP socket into a pipe and from
//! the pipe into the other socket without ever being copied to user space (what HAProxy does
//! for large transfers). A small safe API over rustix; the readiness logic that drives it lives
//! in the copy loop (`super::Direction`).
//!
//! Both calls are made non-blocking (`SPLICE_F_NONBLOCK`, and the sockets are non-blocking
//! under tokio), so an `EAGAIN` is a socket's readiness only if the pipe cannot be the cause:
//! the caller fills the pipe only when it is empty and drains it only when it holds bytes.

use std::io;

/// Whether an error from `pipe2` or splice(2) means "not possible here" (an old or restricted
/// kernel, a seccomp filter, a socket type splice does not handle), after which the direction
/// stays on the user-space copy, rather than a failure of the connection.
pub fn unsupported(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::Unsupported)
        || matches!(
            error.raw_os_error(),
            Some(code) if [
                rustix::io::Errno::INVAL,
                rustix::io::Errno::NOSYS,
                rustix::io::Errno::PERM,
                rustix::io::Errno::OPNOTSUPP,
            ]
            .iter()
            .any(|errno| errno.raw_os_error() == code)
        )
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{PipeFlags, SpliceFlags};
    use tokio::net::TcpStream;

    /// The two ends of a pipe; both close when it is dropped.
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// Bytes the pipe holds at most: the kernel's default, 64 KiB on Linux. Not raised
        /// (F_SETPIPE_SZ): 1 MiB pipes measured no less CPU per GB in the bench (the time is
        /// the kernel's TCP work, not the calls), and an unprivileged user's pipes share a
        /// budget (`pipe-user-pages-soft`, 64 MiB) past which new pipes get 8 KiB: 64 KiB
        /// pipes keep it for a thousand bulk directions.
        capacity: usize,
    }

    /// Non-blocking for the pipe's side of each call; `MOVE` lets the kernel move pages
    /// rather than copy them where it can.
    const FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);

    impl Pipe {
        pub fn new() -> io::Result<Self> {
            let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
            let capacity = rustix::pipe::fcntl_getpipe_size(&read).unwrap_or(64 * 1024);
            Ok(Self {
                read,
                write,
                capacity: capacity.max(4096),
            })
        }

        pub fn capacity(&self) -> usize {
            self.capacity
        }

        /// Moves up to the pipe's capacity from `socket` into the (empty) pipe: `Ok(0)` at the
        /// socket's EOF, `WouldBlock` when it has nothing to read.
        pub fn fill_from(&self, socket: &TcpStream) -> io::Result<usize> {
            Ok(rustix::pipe::splice(
                socket,
                None,
                &self.write,
                None,
                self.capacity,
                FLAGS,
            )?)
        }

        /// Moves up to `len` of the bytes the pipe holds into `socket`: `WouldBlock` when its
        /// send buffer is full.
        pub fn drain_into(&self, socket: &TcpStream, len: usize) -> io::Result<usize> {
            Ok(rustix::pipe::splice(
                &self.read, None, socket, None, len, FLAGS,
            )?)
        }

        /// Reads bytes the pipe holds back into user space (a direction falling back to the
        /// copy loop with bytes still in its pipe).
        pub fn read_back(&self, buf: &mut [u8]) -> io::Result<usize> {
            Ok(rustix::io::read(&self.read, buf)?)
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;

    use tokio::net::TcpStream;

    /// splice(2) is Linux's: elsewhere every direction stays on the copy loop.
    pub struct Pipe(());

    impl Pipe {
        pub fn new() -> io::Result<Self> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub fn capacity(&self) -> usize {
            0
        }
        pub fn fill_from(&self, _socket: &TcpStream) -> io::Result<usize> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub fn drain_into(&self, _socket: &TcpStream, _len: usize) -> io::Result<usize> {
            Err(io::ErrorKind::Unsupported.into())
        }
        pub fn read_back(&self, _buf: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }
}

pub use imp::Pipe;

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::splice::tests::connected_pair;
    use tokio::io::Interest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The bare calls: bytes in at one socket come out at the other, the empty socket answers
    /// WouldBlock (not 0), and EOF is 0.
    #[tokio::test]
    async fn bytes_pass_through_the_pipe_and_eof_reads_as_zero() {
        let (mut client, a) = connected_pair().await;
        let (b, mut server) = connected_pair().await;
        let pipe = Pipe::new().unwrap();
        assert!(pipe.capacity() >= 4096);
        let empty = pipe.fill_from(&a).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        client.write_all(b"hello through the kernel").await.unwrap();
        let mut held = 0;
        while held == 0 {
            a.readable().await.unwrap();
            held = match a.try_io(Interest::READABLE, || pipe.fill_from(&a)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => panic!("{e}"),
            };
        }
        assert_eq!(held, 24);
        assert_eq!(pipe.drain_into(&b, held).unwrap(), 24);
        let mut got = [0u8; 24];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello through the kernel");
        client.shutdown().await.unwrap();
        loop {
            a.readable().await.unwrap();
            match a.try_io(Interest::READABLE, || pipe.fill_from(&a)) {
                Ok(n) => {
                    assert_eq!(n, 0);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn refusals_of_the_kernel_count_as_unsupported_and_others_do_not() {
        for errno in [
            rustix::io::Errno::INVAL,
            rustix::io::Errno::NOSYS,
            rustix::io::Errno::PERM,
            rustix::io::Errno::OPNOTSUPP,
        ] {
            assert!(unsupported(&io::Error::from(errno)), "{errno:?}");
        }
        assert!(unsupported(&io::ErrorKind::Unsupported.into()));
        for errno in [
            rustix::io::Errno::CONNRESET,
            rustix::io::Errno::PIPE,
            rustix::io::Errno::AGAIN,
            rustix::io::Errno::MFILE,
        ] {
            assert!(!unsupported(&io::Error::from(errno)), "{errno:?}");
        }
    }
}
