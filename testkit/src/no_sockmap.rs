//! Runs a binary as if on a kernel built without sockmap support
//! (`CONFIG_BPF_STREAM_PARSER` unset), which no packaged kernel offers.
//!
//! Such a kernel has no `BPF_MAP_TYPE_SOCKMAP`: `bpf(BPF_MAP_CREATE)` for it
//! fails with `EINVAL`, the answer for any map type the kernel does not know.
//! A seccomp filter installed in the child before `exec` gives that answer
//! to every `BPF_MAP_CREATE` (seccomp cannot read the map type behind the
//! attribute pointer); the loaders probe for a SockMap before creating any
//! other map, so what the binary reports is what it reports on such a kernel.
use std::{io, os::unix::process::CommandExt, process::Command};

/// `bpf(2)` command number of `BPF_MAP_CREATE`.
const BPF_MAP_CREATE: u32 = 0;

/// `AUDIT_ARCH_*` of this target (linux/audit.h), checked by the filter so
/// that a syscall number is never read under another ABI.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

// Offsets in `struct seccomp_data`: nr, arch, then the 64-bit args (the low
// half of args[0] first on these little-endian targets).
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARG0_LOW_OFFSET: u32 = 16;

/// Makes `command`'s process see a kernel without sockmap support.
pub fn without_sockmap(command: &mut Command) -> &mut Command {
    // SAFETY: the hook runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe; the filter lives on its stack
    // for the duration of the call (the kernel copies it).
    unsafe { command.pre_exec(install_filter) }
}

fn install_filter() -> io::Result<()> {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, EINVAL, SECCOMP_RET_ALLOW,
        SECCOMP_RET_ERRNO, sock_filter, sock_fprog,
    };
    let load = |offset: u32| sock_filter {
        code: (BPF_LD | BPF_W | BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: offset,
    };
    // Equal: go on with the next instruction; otherwise skip `skip` of them.
    let expect = |value: u32, skip: u8| sock_filter {
        code: (BPF_JMP | BPF_JEQ | BPF_K) as u16,
        jt: 0,
        jf: skip,
        k: value,
    };
    let ret = |value: u32| sock_filter {
        code: (BPF_RET | BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: value,
    };
    let mut filter = [
        load(ARCH_OFFSET),
        expect(AUDIT_ARCH, 5),
        load(NR_OFFSET),
        expect(libc::SYS_bpf as u32, 3),
        load(ARG0_LOW_OFFSET),
        expect(BPF_MAP_CREATE, 1),
        ret(SECCOMP_RET_ERRNO | EINVAL as u32),
        ret(SECCOMP_RET_ALLOW),
    ];
    let program = sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls; `program` points at `filter`, alive here.
    unsafe {
        // Required to install a filter without CAP_SYS_ADMIN; harmless with it.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const sock_fprog,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
