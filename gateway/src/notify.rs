//! systemd's notify protocol (sd_notify(3)), spoken directly: a datagram of `KEY=VALUE` lines
//! to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). Outside systemd the variable is unset and every call does nothing.
//!
//! The daemon says READY=1 once its store is open and its sources are started, WATCHDOG=1
//! while its store answers (so a hung pipeline is restarted under `WatchdogSec=`),
//! RELOADING=1 on SIGHUP and STOPPING=1 on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

enum Target {
    Path(std::path::PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From the environment systemd sets for `Type=notify` services.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec();
            match bytes.first() {
                #[cfg(target_os = "linux")]
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(b'/') => Some(Target::Path(std::path::PathBuf::from(v))),
                _ => None,
            }
        });
        // WATCHDOG_PID, when set, names the process the watchdog is for.
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0 && for_us)
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    /// How often to say WATCHDOG=1: half the watchdog timeout, as sd_watchdog_enabled(3)
    /// advises; None when no watchdog is set.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn reloading(&self) {
        self.send("RELOADING=1\nSTATUS=reloading the configuration");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: sealing the open batch");
    }

    fn send(&self, msg: &str) {
        let Some(target) = &self.target else { return };
        let Ok(sock) = UnixDatagram::unbound() else {
            return;
        };
        let sent = match target {
            Target::Path(p) => sock.send_to(msg.as_bytes(), p),
            #[cfg(target_os = "linux")]
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
            }
        };
        if let Err(e) = sent {
            tracing::debug!("systemd notify: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Target::Path(path)),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.ready("2 sources");
        n.watchdog();
        let mut buf = [0u8; 256];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1\nSTATUS=2 sources");
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"WATCHDOG=1");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
        let off = Notifier {
            target: None,
            watchdog: None,
        };
        off.ready("nothing to send to");
        assert_eq!(off.watchdog_interval(), None);
    }
}
