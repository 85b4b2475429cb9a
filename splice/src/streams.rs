//! The probe's `STREAMS` and `CONTROL` arrays mapped into memory, so that
//! userspace reads a socket's [`splice_common::Stream`] and writes its
//! [`splice_common::Control`] without a system call: the flow control
//! touches every spliced source often.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::{self, NonNull},
};

use aya::maps::MapData;

/// A `BPF_F_MMAPABLE` array of `T`, mapped.
pub struct MappedArray<T> {
    values: NonNull<T>,
    slots: u32,
    mapped_len: usize,
}

impl<T: Copy> MappedArray<T> {
    /// Maps the `slots` values of `map`.
    pub fn map(map: &MapData, slots: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapped_len = (slots as usize * size_of::<T>()).div_ceil(page) * page;
        // SAFETY: a shared read-write mapping of a BPF array fd; the kernel
        // checks the length against the map and the flags it was made with.
        let address = unsafe {
            libc::mmap(
                ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            values: NonNull::new(address.cast()).expect("mmap returned null"),
            slots,
            mapped_len,
        })
    }

    fn slot(&self, slot: u32) -> *mut T {
        assert!(slot < self.slots, "slot {slot} out of {}", self.slots);
        // SAFETY: in bounds, checked above.
        unsafe { self.values.as_ptr().add(slot as usize) }
    }

    /// The value in `slot`.
    pub fn get(&self, slot: u32) -> T {
        // SAFETY: the mapping lives as long as `self`; the probe may write
        // the slot concurrently, and a volatile read of aligned u32/u64
        // fields sees each field whole (a stale value only delays a check).
        unsafe { ptr::read_volatile(self.slot(slot)) }
    }

    /// Sets the value in `slot`: only where userspace is its one writer.
    pub fn set(&self, slot: u32, value: T) {
        // SAFETY: as in `get`; the caller guarantees no concurrent writer.
        unsafe { ptr::write_volatile(self.slot(slot), value) }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.values.as_ptr().cast(), self.mapped_len) };
    }
}
