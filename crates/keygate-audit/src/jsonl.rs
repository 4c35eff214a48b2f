//! [`JsonlSink`]: audit events as JSON Lines, written by a background thread, with size-based
//! rotation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::event::AuditEvent;
use crate::sink::{AuditSink, Counters, SinkStats};

/// Default queue capacity of a [`JsonlSink`].
pub const DEFAULT_CAPACITY: usize = 8192;
/// Default size at which a [`JsonlSink`] file is rotated (64 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: usize = 10;

#[allow(clippy::large_enum_variant)] // events are nearly all messages
enum Msg {
    Event(AuditEvent),
    Flush(mpsc::Sender<()>),
    Shutdown,
}

/// Writes audit events as JSON Lines (one `serde_json` object per line, so `\r` and `\n` in any
/// value are escaped and cannot start a new record).
///
/// Events go through a bounded queue to a background thread that writes them; a full queue drops
/// the event and counts it ([`JsonlSink::stats`], metric `keygate_audit_events_dropped_total`).
/// Files rotate by size: `audit.jsonl` becomes `audit.jsonl.1`, `.1` becomes `.2`, and so on up to
/// the number kept. [`JsonlSink::shutdown`] (or dropping the last clone) writes out what is
/// queued, flushes and stops the thread.
///
/// ```
/// use keygate_audit::{AuditSink, JsonlSink};
/// # let dir = tempfile::tempdir()?;
/// let sink = JsonlSink::builder(dir.path().join("audit.jsonl"))
///     .with_capacity(1024)
///     .with_max_bytes(1 << 20)
///     .open()?;
/// assert!(sink.can_accept());
/// sink.shutdown();
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct JsonlSink {
    inner: Arc<Inner>,
}

struct Inner {
    tx: SyncSender<Msg>,
    counters: Arc<Counters>,
    healthy: Arc<AtomicBool>,
    capacity: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Builds a [`JsonlSink`] writing to a file.
#[derive(Debug, Clone)]
#[must_use]
pub struct JsonlBuilder {
    path: PathBuf,
    capacity: NonZeroUsize,
    max_bytes: u64,
    keep: usize,
}

impl JsonlBuilder {
    /// Sets how many events may wait for the writer (default [`DEFAULT_CAPACITY`]; at least 1).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        self
    }

    /// Sets the size at which the file is rotated (default [`DEFAULT_MAX_BYTES`]); a file always
    /// takes at least one line, so 0 rotates after every line.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets how many rotated files are kept (default [`DEFAULT_KEEP`]); 0 keeps none.
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    /// Opens (appending) or creates the file and starts the writer thread.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or the thread cannot be started.
    pub fn open(self) -> io::Result<JsonlSink> {
        let file = open_append(&self.path)?;
        let size = file.metadata()?.len();
        let out = Output::File(Rotating {
            path: self.path,
            file: BufWriter::new(file),
            size,
            max_bytes: self.max_bytes,
            keep: self.keep,
        });
        JsonlSink::start(out, self.capacity.get())
    }
}

impl JsonlSink {
    /// A builder for a sink writing to `path`.
    pub fn builder(path: impl Into<PathBuf>) -> JsonlBuilder {
        JsonlBuilder {
            path: path.into(),
            capacity: NonZeroUsize::new(DEFAULT_CAPACITY).unwrap_or(NonZeroUsize::MIN),
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
        }
    }

    /// A sink writing to any writer (no rotation), with a queue of `capacity` events (at least 1).
    ///
    /// # Errors
    ///
    /// When the writer thread cannot be started.
    pub fn to_writer(writer: impl Write + Send + 'static, capacity: usize) -> io::Result<Self> {
        Self::start(Output::Writer(Box::new(writer)), capacity.max(1))
    }

    fn start(out: Output, capacity: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let counters = Arc::new(Counters::default());
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            out,
            counters: counters.clone(),
            healthy: healthy.clone(),
            line: Vec::with_capacity(512),
        };
        let thread = std::thread::Builder::new()
            .name("keygate-audit-jsonl".into())
            .spawn(move || writer.run(rx))?;
        Ok(JsonlSink {
            inner: Arc::new(Inner {
                tx,
                counters,
                healthy,
                capacity,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The sink's counters. After [`JsonlSink::shutdown`], `accepted == written + write_errors`,
    /// and every event offered is in `accepted + dropped`.
    pub fn stats(&self) -> SinkStats {
        self.inner.counters.stats(self.inner.capacity)
    }

    /// Waits until every event queued before this call is written and flushed.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        if self.inner.tx.send(Msg::Flush(ack)).is_ok() {
            self.inner.unpark();
            let _ = done.recv();
        }
    }

    /// Writes out the queue, flushes, and stops the writer; later events are dropped and counted.
    /// Also done when the last clone is dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            handle.thread().unpark();
            let _ = self.tx.send(Msg::Shutdown);
            handle.thread().unpark();
            let _ = handle.join();
        }
    }

    fn unpark(&self) {
        if let Some(handle) = &*self.thread.lock().unwrap_or_else(|p| p.into_inner()) {
            handle.thread().unpark();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for JsonlSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlSink")
            .field("stats", &self.stats())
            .finish()
    }
}

impl AuditSink for JsonlSink {
    fn record(&self, event: &AuditEvent) {
        self.record_owned(event.clone());
    }

    fn record_owned(&self, event: AuditEvent) {
        let c = &self.inner.counters;
        // Count before sending so the writer never sees the queue length go below zero.
        let queued = c.reserve();
        match self.inner.tx.try_send(Msg::Event(event)) {
            Ok(()) => c.commit(queued),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                c.on_dequeue();
                c.on_drop("jsonl");
            }
        }
    }

    fn can_accept(&self) -> bool {
        let queued = self.inner.counters.queued.load(Ordering::Acquire);
        self.inner.healthy.load(Ordering::Acquire)
            && usize::try_from(queued).unwrap_or(0) < self.inner.capacity
    }
}

enum Output {
    File(Rotating),
    Writer(Box<dyn Write + Send>),
}

impl Output {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Output::File(r) => r.write_line(line),
            Output::Writer(w) => w.write_all(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::File(r) => r.file.flush(),
            Output::Writer(w) => w.flush(),
        }
    }
}

struct Rotating {
    path: PathBuf,
    file: BufWriter<File>,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl Rotating {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if self.size > 0 && self.size.saturating_add(len) > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            let _ = fs::remove_file(numbered(&self.path, self.keep));
            for i in (1..self.keep).rev() {
                let from = numbered(&self.path, i);
                if from.exists() {
                    fs::rename(&from, numbered(&self.path, i + 1))?;
                }
            }
            fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        self.file = BufWriter::new(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

const IDLE_MIN: Duration = Duration::from_micros(500);
const IDLE_MAX: Duration = Duration::from_millis(20);

struct Writer {
    out: Output,
    counters: Arc<Counters>,
    healthy: Arc<AtomicBool>,
    line: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut idle = IDLE_MIN;
        loop {
            let msg = match rx.try_recv() {
                Ok(msg) => {
                    idle = IDLE_MIN;
                    msg
                }
                Err(TryRecvError::Empty) => {
                    // Idle: flush what is buffered, then nap. Napping instead of blocking in
                    // `recv` means senders never pay for waking this thread; control messages
                    // (flush, shutdown) unpark it at once.
                    self.flush();
                    std::thread::park_timeout(idle);
                    idle = (idle * 2).min(IDLE_MAX);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            };
            match msg {
                Msg::Event(event) => {
                    self.counters.on_dequeue();
                    self.write(&event);
                }
                Msg::Flush(ack) => {
                    self.flush();
                    let _ = ack.send(());
                }
                Msg::Shutdown => break,
            }
        }
        // Whatever was queued before the shutdown message has been written by now.
        self.flush();
    }

    fn write(&mut self, event: &AuditEvent) {
        self.line.clear();
        let result = serde_json::to_writer(&mut self.line, event)
            .map_err(io::Error::from)
            .and_then(|()| {
                self.line.push(b'\n');
                self.out.write_line(&self.line)
            });
        match result {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Release);
            }
            Err(_) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                self.healthy.store(false, Ordering::Release);
                crate::metrics::write_error("jsonl");
            }
        }
    }

    fn flush(&mut self) {
        if self.out.flush().is_err() {
            self.healthy.store(false, Ordering::Release);
        }
    }
}
