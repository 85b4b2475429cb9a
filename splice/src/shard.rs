//! One executor's probe, as a server's connection tasks use it: loaded on
//! the executor (so that its maps are that core's own), with its flow
//! control running, and a [`ShardProbe::splice`] that counts and logs
//! what happens to each insert.
use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use super::{
    InsertError, KernelView, Member, Probe, ProbeConfig, Splice, flow,
    stats::{SpliceStats, add},
};

/// What an executor needs to load its own copy of a probe.
#[derive(Clone)]
pub struct ProbeSpec {
    pub object: Arc<Vec<u8>>,
    pub config: ProbeConfig,
    /// What the probe is, in error messages ("echo probe").
    pub what: &'static str,
}

/// An executor's loaded probe.
pub struct ShardProbe {
    probe: Rc<RefCell<Probe>>,
    stats: Arc<SpliceStats>,
    warned_full: Cell<bool>,
    splice_after: u64,
    /// Maps adopted from another process: its slots are not the
    /// executor's to count (`slots_in_use` is its own probe's).
    adopted: bool,
}

impl ShardProbe {
    /// Loads the probe on this executor and starts its flow control.
    /// Returns it with a view on its maps for the main thread.
    pub fn load(
        spec: &ProbeSpec,
        core: usize,
        stats: Arc<SpliceStats>,
    ) -> Result<(Self, KernelView), String> {
        let probe = Probe::load(&spec.object, spec.config)
            .map_err(|e| format!("loading the {} for core {core}: {e}", spec.what))?;
        let view = probe
            .kernel_view()
            .map_err(|e| format!("opening the probe maps of core {core}: {e}"))?;
        let probe = Rc::new(RefCell::new(probe));
        glommio::spawn_local(flow::run(Rc::clone(&probe))).detach();
        Ok((
            Self {
                probe,
                stats,
                warned_full: Cell::new(false),
                splice_after: spec.config.splice_after,
                adopted: false,
            },
            view,
        ))
    }

    /// Bytes a direction carries in userspace before it is spliced (see
    /// [`ProbeConfig::splice_after`]).
    pub fn splice_after(&self) -> u64 {
        self.splice_after
    }

    /// Splices `members`, or says (in the counters and, once, in the log)
    /// why userspace forwards this connection instead.
    pub fn splice(&self, members: &[Member<'_>]) -> Option<Splice> {
        let result = Splice::insert(&self.probe, members);
        let splice = match result {
            Ok(splice) => {
                add(&self.stats.spliced, 1);
                add(&self.stats.early, u64::from(splice.had_early_bytes()));
                Some(splice)
            }
            Err(InsertError::Full { capacity }) => {
                if !self.warned_full.replace(true) {
                    tracing::warn!(
                        "SockMap full ({capacity} slots on this core): connections are forwarded \
                         in userspace until slots free up (logged once; counted as sockmap_full)"
                    );
                }
                add(&self.stats.sockmap_full, 1);
                None
            }
            Err(e) => {
                tracing::debug!("not spliced ({e}): forwarding in userspace");
                add(&self.stats.insert_failed, 1);
                None
            }
        };
        if splice.is_none() {
            add(&self.stats.copied, 1);
        }
        self.update_slots_gauge();
        splice
    }

    /// Adopts the maps of another process's probe ([`super::handover`]):
    /// the connections handed over with them go on in them (no new one is
    /// spliced there), with a flow control of their own.
    pub fn adopt(
        fds: Vec<std::os::fd::OwnedFd>,
        config: ProbeConfig,
        stats: Arc<SpliceStats>,
    ) -> Result<Self, String> {
        let probe = Probe::adopt(fds, config).map_err(|e| e.to_string())?;
        let probe = Rc::new(RefCell::new(probe));
        glommio::spawn_local(flow::run(Rc::clone(&probe))).detach();
        Ok(Self {
            probe,
            stats,
            warned_full: Cell::new(false),
            splice_after: config.splice_after,
            adopted: true,
        })
    }

    /// Tells this probe from the executor's others (its connections'
    /// [`super::handover::PipeState::probe`]).
    pub fn key(&self) -> u64 {
        Rc::as_ptr(&self.probe) as usize as u64
    }

    /// Copies of its maps' descriptors, to hand over (see [`Probe::map_fds`]),
    /// and how it is sized.
    pub fn export(&self) -> std::io::Result<(Vec<std::os::fd::OwnedFd>, ProbeConfig)> {
        let probe = self.probe.borrow();
        Ok((
            probe.map_fds()?,
            ProbeConfig {
                capacity: probe.capacity(),
                in_flight_limit: probe.in_flight_limit(),
                // The maps splice no new connection where they go.
                splice_after: 0,
            },
        ))
    }

    pub(crate) fn probe(&self) -> &Rc<RefCell<Probe>> {
        &self.probe
    }

    /// Records the slots in use (call after a splice drops too).
    pub fn update_slots_gauge(&self) {
        if self.adopted {
            return;
        }
        let probe = self.probe.borrow();
        let in_use = u64::from(probe.capacity()) - probe.free_slots() as u64;
        self.stats.slots_in_use.store(in_use, Relaxed);
    }
}
