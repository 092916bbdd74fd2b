//! Limits per client address on the device listeners: how many sockets one IP address may
//! hold, and how many it may open per second. Both are off (0) by default: behind a NAT or
//! a load balancer that does not pass client addresses through, one address is many
//! devices, and the tests and the load harness connect every device from loopback.
//!
//! A socket over either limit is closed as it arrives, before any handshake work.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use crate::config::Limits;

/// Past this many tracked addresses, those with no socket and no recent connect are
/// forgotten (at most once a second); while the map stays that full, new addresses are let
/// in untracked, so the map and the work per accept stay bounded.
const TRACKED_ADDRESSES: usize = 65_536;

/// The per-address limits of one process's device listeners.
#[derive(Debug)]
pub struct PerIpLimits {
    max_connections: u32,
    connects_per_second: u32,
    addresses: DashMap<IpAddr, Usage>,
    started: Instant,
    /// The second (since `started`) of the last sweep of the map, plus one.
    swept: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Usage {
    /// Sockets open now.
    connections: u32,
    /// The second (since `started`) the connects below were counted in.
    second: u64,
    /// Connects in that second.
    connects: u32,
}

/// A socket's place within its address's limit, given back when dropped.
#[derive(Debug)]
pub struct PerIpSlot {
    limits: Arc<PerIpLimits>,
    address: IpAddr,
}

impl PerIpLimits {
    /// The limits of `limits.max_connections_per_ip` and `limits.connects_per_ip_per_second`;
    /// `None` when both are off.
    pub fn new(limits: &Limits) -> Option<Arc<Self>> {
        (limits.max_connections_per_ip > 0 || limits.connects_per_ip_per_second > 0).then(|| {
            Arc::new(Self {
                max_connections: limits.max_connections_per_ip,
                connects_per_second: limits.connects_per_ip_per_second,
                addresses: DashMap::new(),
                started: Instant::now(),
                swept: std::sync::atomic::AtomicU64::new(0),
            })
        })
    }

    /// A place for a new socket from `address`, unless the address is over a limit.
    /// `Some(None)`: let in, but untracked (the map is full).
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Option<PerIpSlot>> {
        use std::sync::atomic::Ordering;
        let second = self.started.elapsed().as_secs();
        if self.addresses.len() >= TRACKED_ADDRESSES && !self.addresses.contains_key(&address) {
            if self.swept.swap(second + 1, Ordering::AcqRel) != second + 1 {
                self.addresses
                    .retain(|_, usage| usage.connections > 0 || usage.second == second);
            }
            if self.addresses.len() >= TRACKED_ADDRESSES {
                return Some(None);
            }
        }
        let mut usage = self.addresses.entry(address).or_default();
        if usage.second != second {
            usage.second = second;
            usage.connects = 0;
        }
        let too_many = self.max_connections > 0 && usage.connections >= self.max_connections;
        let too_fast = self.connects_per_second > 0 && usage.connects >= self.connects_per_second;
        if too_many || too_fast {
            return None;
        }
        usage.connections += 1;
        usage.connects += 1;
        Some(Some(PerIpSlot {
            limits: self.clone(),
            address,
        }))
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        if let Some(mut usage) = self.limits.addresses.get_mut(&self.address) {
            usage.connections = usage.connections.saturating_sub(1);
        }
        // An address with no socket left is forgotten once its second has passed.
        let second = self.limits.started.elapsed().as_secs();
        self.limits.addresses.remove_if(&self.address, |_, usage| {
            usage.connections == 0 && usage.second != second
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: u32, connects_per_second: u32) -> Arc<PerIpLimits> {
        PerIpLimits::new(&Limits {
            max_connections_per_ip: max_connections,
            connects_per_ip_per_second: connects_per_second,
            ..Limits::default()
        })
        .expect("limits on")
    }

    #[test]
    fn off_by_default() {
        assert!(PerIpLimits::new(&Limits::default()).is_none());
    }

    #[test]
    fn an_address_holds_at_most_its_sockets_and_others_are_unaffected() {
        let limits = limits(2, 0);
        let one: IpAddr = [10, 0, 0, 1].into();
        let two: IpAddr = [10, 0, 0, 2].into();
        let first = limits.admit(one).expect("first");
        let _second = limits.admit(one).expect("second");
        assert!(limits.admit(one).is_none());
        assert!(limits.admit(two).is_some());
        drop(first);
        assert!(limits.admit(one).is_some());
    }

    #[test]
    fn an_address_opens_at_most_its_rate_per_second() {
        let limits = limits(0, 3);
        let one: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..3 {
            // Closed at once: the rate counts connects, not open sockets.
            drop(limits.admit(one).expect("within the rate"));
        }
        assert!(limits.admit(one).is_none());
        assert!(limits.admit([10, 0, 0, 2].into()).is_some());
    }
}
