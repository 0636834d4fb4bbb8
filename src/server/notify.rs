//! Telling systemd (`Type=notify`) where the process stands: READY=1 once
//! every listener is bound and upstream was probed, RELOADING=1 and then
//! READY=1 around a SIGHUP reload, STOPPING=1 when a shutdown begins, and
//! WATCHDOG=1 from the event loop at half of `WatchdogSec` (so a wedged
//! runtime stops the pings and systemd restarts us). Nothing is sent when
//! NOTIFY_SOCKET is unset (not run by systemd).

use sd_notify::NotifyState;
use std::time::Duration;

pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Before a reload; `ready` after it. MONOTONIC_USEC lets systemd's
/// `Type=notify-reload` tell this reload from an earlier one.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Pings the watchdog at half its interval while the runtime runs; None
/// when systemd set no watchdog.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = sd_notify::watchdog_enabled()? / 2;
    let every = every.max(Duration::from_millis(10));
    tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
