//! systemd's notification protocol (sd_notify(3)) for `Type=notify` units: readiness, reloads,
//! stopping, status lines and watchdog pings, sent as datagrams to `$NOTIFY_SOCKET`. Written
//! here in a few lines rather than linking libsystemd, which a box may not have.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The service's link to systemd; does nothing when not started by systemd.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, NotifyAddress)>,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    /// Pings start after `READY=1`: before it systemd is still waiting for the start.
    ready: bool,
}

#[derive(Debug, Clone)]
enum NotifyAddress {
    Path(PathBuf),
    /// Linux abstract namespace (`@name`).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|address| {
            let address = address.to_string_lossy().into_owned();
            let address = match address.strip_prefix('@') {
                Some(name) => NotifyAddress::Abstract(name.as_bytes().to_vec()),
                None => NotifyAddress::Path(PathBuf::from(address)),
            };
            match UnixDatagram::unbound() {
                Ok(socket) => Some((socket, address)),
                Err(error) => {
                    tracing::warn!("NOTIFY_SOCKET is set but no socket could be made: {error}");
                    None
                }
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|&usec| usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog, last_ping: None, ready: false }
    }

    /// Whether systemd listens.
    pub fn is_active(&self) -> bool {
        self.socket.is_some()
    }

    /// How often the watchdog must be pinged (half its timeout), when it is on.
    pub fn ping_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Sends one notification (`READY=1`, `STATUS=…`); errors are logged, never fatal.
    pub fn send(&self, message: &str) {
        let Some((socket, address)) = &self.socket else { return };
        let sent = match address {
            NotifyAddress::Path(path) => socket.send_to(message.as_bytes(), path),
            #[cfg(target_os = "linux")]
            NotifyAddress::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|address| socket.send_to_addr(message.as_bytes(), &address))
            }
            #[cfg(not(target_os = "linux"))]
            NotifyAddress::Abstract(_) => Err(std::io::Error::other("abstract sockets need Linux")),
        };
        if let Err(error) = sent {
            tracing::warn!("cannot notify systemd ({message}): {error}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&mut self, status: &str) {
        self.ready = true;
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` (with the monotonic time systemd ≥ 253 asks for).
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `WATCHDOG=1`, when the watchdog is on and half its timeout passed since the last ping.
    /// Called from the scheduler's loop: if that loop hangs, systemd restarts the service.
    pub fn ping_watchdog(&mut self) {
        let Some(interval) = self.ping_interval().filter(|_| self.ready) else { return };
        if self.last_ping.is_some_and(|last| last.elapsed() < interval) {
            return;
        }
        self.last_ping = Some(Instant::now());
        self.send("WATCHDOG=1");
    }
}

fn monotonic_usec() -> u64 {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut time) };
    if result != 0 {
        return 0;
    }
    (time.tv_sec as u64).saturating_mul(1_000_000).saturating_add(time.tv_nsec as u64 / 1000)
}
