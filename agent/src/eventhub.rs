//! Exits and OOM kills for every reader of `GetEvent`.
//!
//! The first reader (a request without a watcher name: the shim, `tegmen
//! events`) gets every event, queued without bound, as before there were
//! watchers. A named watcher (`supervisor events`) gets the events that
//! happen from its first request on, in a queue of its own that keeps the
//! newest [`WATCHER_QUEUE`] (the oldest are dropped); a watcher that has
//! not asked for a minute is forgotten, and at most [`MAX_WATCHERS`] exist.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::container::Event;

pub const WATCHER_QUEUE: usize = 1024;
pub const MAX_WATCHERS: usize = 16;
const WATCHER_IDLE: Duration = Duration::from_secs(60);
/// Longest name a watcher may have.
const MAX_NAME: usize = 128;

struct Watcher {
    queue: VecDeque<Event>,
    last_seen: Instant,
}

#[derive(Default)]
struct Inner {
    primary: VecDeque<Event>,
    watchers: HashMap<String, Watcher>,
    closed: bool,
}

#[derive(Default)]
pub struct EventHub {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl EventHub {
    /// A hub fed from `events` by a thread of its own.
    pub fn start(events: Receiver<Event>) -> Arc<EventHub> {
        let hub = Arc::new(EventHub::default());
        let feeder = hub.clone();
        std::thread::spawn(move || {
            while let Ok(e) = events.recv() {
                feeder.publish(e);
            }
            feeder.lock().closed = true;
            feeder.changed.notify_all();
        });
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn publish(&self, e: Event) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner
            .watchers
            .retain(|_, w| now.duration_since(w.last_seen) < WATCHER_IDLE);
        for w in inner.watchers.values_mut() {
            if w.queue.len() == WATCHER_QUEUE {
                w.queue.pop_front();
            }
            w.queue.push_back(e.clone());
        }
        inner.primary.push_back(e);
        drop(inner);
        self.changed.notify_all();
    }

    /// The first reader's next event; `None` once the source has closed
    /// and everything was read.
    pub fn next_primary(&self) -> Option<Event> {
        let mut inner = self.lock();
        loop {
            if let Some(e) = inner.primary.pop_front() {
                return Some(e);
            }
            if inner.closed {
                return None;
            }
            inner = self.changed.wait(inner).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Watcher `name`'s next event, waiting at most `wait` (`Ok(None)`
    /// then); its first call registers it.
    pub fn next_for(&self, name: &str, wait: Duration) -> Result<Option<Event>, String> {
        if name.len() > MAX_NAME {
            return Err(format!("a watcher name has at most {MAX_NAME} bytes"));
        }
        let deadline = Instant::now() + wait;
        let mut inner = self.lock();
        if !inner.watchers.contains_key(name) {
            let now = Instant::now();
            inner
                .watchers
                .retain(|_, w| now.duration_since(w.last_seen) < WATCHER_IDLE);
            if inner.watchers.len() >= MAX_WATCHERS {
                return Err(format!("{MAX_WATCHERS} event watchers exist already"));
            }
            inner.watchers.insert(
                name.to_string(),
                Watcher {
                    queue: VecDeque::new(),
                    last_seen: now,
                },
            );
        }
        loop {
            let closed = inner.closed;
            let w = inner.watchers.get_mut(name).expect("registered above");
            w.last_seen = Instant::now();
            if let Some(e) = w.queue.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if closed || left.is_zero() {
                return Ok(None);
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom(id: &str) -> Event {
        Event::Oom { id: id.to_string() }
    }

    #[test]
    fn the_primary_gets_all_a_watcher_what_follows_its_first_call() {
        let hub = EventHub::default();
        hub.publish(oom("before"));
        assert_eq!(hub.next_for("w", Duration::ZERO), Ok(None));
        hub.publish(oom("after"));
        assert_eq!(hub.next_primary(), Some(oom("before")));
        assert_eq!(hub.next_primary(), Some(oom("after")));
        assert_eq!(hub.next_for("w", Duration::ZERO), Ok(Some(oom("after"))));
        assert_eq!(hub.next_for("w", Duration::from_millis(10)), Ok(None));
    }

    #[test]
    fn watcher_queues_and_numbers_are_bounded() {
        let hub = EventHub::default();
        hub.next_for("w", Duration::ZERO).unwrap();
        for i in 0..WATCHER_QUEUE + 10 {
            hub.publish(oom(&i.to_string()));
        }
        assert_eq!(
            hub.next_for("w", Duration::ZERO),
            Ok(Some(oom("10"))),
            "the oldest went"
        );
        for i in 1..MAX_WATCHERS {
            hub.next_for(&format!("w{i}"), Duration::ZERO).unwrap();
        }
        assert!(hub.next_for("one too many", Duration::ZERO).is_err());
        assert!(hub.next_for(&"x".repeat(200), Duration::ZERO).is_err());
    }

    #[test]
    fn a_waiting_watcher_wakes_and_a_closed_source_ends_the_primary() {
        let (tx, rx) = std::sync::mpsc::channel();
        let hub = EventHub::start(rx);
        hub.next_for("w", Duration::ZERO).unwrap();
        let h = hub.clone();
        let t = std::thread::spawn(move || h.next_for("w", Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        tx.send(oom("x")).unwrap();
        assert_eq!(t.join().unwrap(), Ok(Some(oom("x"))));
        drop(tx);
        assert_eq!(hub.next_primary(), Some(oom("x")));
        assert_eq!(hub.next_primary(), None);
    }
}
