//! [`JsonlSink`]: audit events as JSON Lines, written by a background thread, with size-based
//! rotation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::event::AuditEvent;
use crate::sink::{AuditSink, Counters, SinkStats};

/// Default queue capacity of a [`JsonlSink`].
pub const DEFAULT_CAPACITY: usize = 8192;
/// Default size at which a [`JsonlSink`] file is rotated (64 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: usize = 10;

/// How long a failing output may keep lines before they go to the fallback writer (5 s).
pub const DEFAULT_FALLBACK_AFTER: Duration = Duration::from_secs(5);

/// A batch is written once it holds this much (or the queue is empty).
const BATCH_BYTES: usize = 64 * 1024;
/// Room in the channel beyond the event slots, for flush and shutdown messages.
const CONTROL_ROOM: usize = 8;

#[allow(clippy::large_enum_variant)] // events are nearly all messages
enum Msg {
    Event(AuditEvent),
    Flush(mpsc::Sender<()>),
    Shutdown,
}

/// Writes audit events as JSON Lines (one `serde_json` object per line, so `\r` and `\n` in any
/// value are escaped and cannot start a new record).
///
/// Events go through a bounded queue to a background thread that writes them in batches,
/// straight to the file (no buffer that could hold lines back). Files rotate by size:
/// `audit.jsonl` becomes `audit.jsonl.1`, `.1` becomes `.2`, and so on up to the number kept.
/// [`JsonlSink::shutdown`] (or dropping the last clone) writes out what is queued and stops the
/// thread.
///
/// # When writing fails
///
/// A line counts as written ([`SinkStats::written`]) only once the write to the file succeeded
/// (for a plain writer: the write and its flush). A failed write (disk full, read-only file,
/// failed rotation) cuts any half-written line off the file, marks the sink unhealthy
/// ([`AuditSink::can_accept`] and [`AuditSink::try_reserve`] say no, so a fail-closed audit
/// layer answers 503), and keeps the lines to write them again, backing off from 10 ms to 1 s.
/// The sink is healthy again after the next write that succeeds. Lines kept longer than the
/// fallback delay ([`JsonlBuilder::with_fallback_after`], default [`DEFAULT_FALLBACK_AFTER`]),
/// and all kept lines at [`JsonlSink::flush`] and shutdown, go to the fallback writer (stderr
/// unless [`JsonlBuilder::with_fallback`] names another) and are counted in
/// [`SinkStats::fallback`]. Kept lines hold their queue slots, so the queue's capacity bounds
/// them. After shutdown every event offered is counted in exactly one of `written`, `fallback`
/// and `dropped`, and `queue_len` is 0.
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
    /// The writer's end while it runs; kept after shutdown to count late events as dropped.
    rx: Arc<Mutex<Receiver<Msg>>>,
    closed: AtomicBool,
    counters: Arc<Counters>,
    healthy: Arc<AtomicBool>,
    capacity: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum Target {
    Path(PathBuf),
    Writer(Box<dyn Write + Send>),
}

/// Builds a [`JsonlSink`] writing to a file ([`JsonlSink::builder`]) or to any writer
/// ([`JsonlSink::writer_builder`]).
#[must_use]
pub struct JsonlBuilder {
    target: Target,
    capacity: NonZeroUsize,
    max_bytes: u64,
    keep: usize,
    fallback: Option<Box<dyn Write + Send>>,
    fallback_after: Duration,
}

impl std::fmt::Debug for JsonlBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match &self.target {
            Target::Path(p) => p.display().to_string(),
            Target::Writer(_) => "<writer>".to_owned(),
        };
        f.debug_struct("JsonlBuilder")
            .field("target", &target)
            .field("capacity", &self.capacity)
            .field("max_bytes", &self.max_bytes)
            .field("keep", &self.keep)
            .field("fallback", &self.fallback.is_some())
            .field("fallback_after", &self.fallback_after)
            .finish()
    }
}

impl JsonlBuilder {
    /// Sets how many events may wait for the writer, kept lines included (default
    /// [`DEFAULT_CAPACITY`]; at least 1).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        self
    }

    /// Sets the size at which the file is rotated (default [`DEFAULT_MAX_BYTES`]); a file always
    /// takes at least one line, so 0 rotates after every line. Not used for writers.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets how many rotated files are kept (default [`DEFAULT_KEEP`]); 0 keeps none. Not used
    /// for writers.
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    /// Sets where lines go when the output keeps failing (default stderr).
    pub fn with_fallback(mut self, fallback: impl Write + Send + 'static) -> Self {
        self.fallback = Some(Box::new(fallback));
        self
    }

    /// No fallback writer: lines the output cannot take are kept (up to the capacity) and
    /// retried, and are dropped and counted only at shutdown.
    ///
    /// # Security
    ///
    /// Without a fallback, records of requests already admitted are lost if the output never
    /// recovers before shutdown.
    pub fn without_fallback(mut self) -> Self {
        self.fallback = None;
        self
    }

    /// Sets how long a failing output may keep lines before they go to the fallback (default
    /// [`DEFAULT_FALLBACK_AFTER`]; zero sends them at the first failure).
    pub fn with_fallback_after(mut self, delay: Duration) -> Self {
        self.fallback_after = delay;
        self
    }

    /// Opens (appending) or creates the file, and starts the writer thread.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or the thread cannot be started.
    pub fn open(self) -> io::Result<JsonlSink> {
        let out = match self.target {
            Target::Path(path) => {
                let file = open_append(&path)?;
                let size = file.metadata()?.len();
                Output::File(Rotating {
                    path,
                    file,
                    size,
                    max_bytes: self.max_bytes,
                    keep: self.keep,
                    moved: false,
                })
            }
            Target::Writer(w) => Output::Writer(w),
        };
        JsonlSink::start(out, self.capacity.get(), self.fallback, self.fallback_after)
    }
}

impl JsonlSink {
    /// A builder for a sink writing to `path`.
    pub fn builder(path: impl Into<PathBuf>) -> JsonlBuilder {
        Self::builder_for(Target::Path(path.into()))
    }

    /// A builder for a sink writing to any writer (no rotation).
    pub fn writer_builder(writer: impl Write + Send + 'static) -> JsonlBuilder {
        Self::builder_for(Target::Writer(Box::new(writer)))
    }

    fn builder_for(target: Target) -> JsonlBuilder {
        JsonlBuilder {
            target,
            capacity: NonZeroUsize::new(DEFAULT_CAPACITY).unwrap_or(NonZeroUsize::MIN),
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            fallback: Some(Box::new(io::stderr())),
            fallback_after: DEFAULT_FALLBACK_AFTER,
        }
    }

    /// A sink writing to any writer (no rotation), with a queue of `capacity` events (at least 1)
    /// and stderr as fallback.
    ///
    /// # Errors
    ///
    /// When the writer thread cannot be started.
    pub fn to_writer(writer: impl Write + Send + 'static, capacity: usize) -> io::Result<Self> {
        Self::writer_builder(writer).with_capacity(capacity).open()
    }

    fn start(
        out: Output,
        capacity: usize,
        fallback: Option<Box<dyn Write + Send>>,
        fallback_after: Duration,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(capacity.saturating_add(CONTROL_ROOM));
        let rx = Arc::new(Mutex::new(rx));
        let counters = Arc::new(Counters::default());
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            out,
            fallback,
            fallback_after,
            counters: counters.clone(),
            healthy: healthy.clone(),
            batch: Batch::default(),
            failing_since: None,
            retry_at: None,
            backoff: RETRY_MIN,
        };
        let thread_rx = rx.clone();
        let thread = std::thread::Builder::new()
            .name("keygate-audit-jsonl".into())
            .spawn(move || {
                let rx = thread_rx.lock().unwrap_or_else(|p| p.into_inner());
                writer.run(&rx);
            })?;
        Ok(JsonlSink {
            inner: Arc::new(Inner {
                tx,
                rx,
                closed: AtomicBool::new(false),
                counters,
                healthy,
                capacity,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The sink's counters. After [`JsonlSink::shutdown`], every event offered is counted in
    /// exactly one of `written`, `fallback` and `dropped`.
    pub fn stats(&self) -> SinkStats {
        self.inner.counters.stats(self.inner.capacity)
    }

    /// Waits until every event queued before this call is written; lines the output cannot
    /// take go to the fallback writer now (they stay kept if there is none).
    pub fn flush(&self) {
        if self.inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let (ack, done) = mpsc::channel();
        if self.inner.tx.send(Msg::Flush(ack)).is_ok() {
            self.inner.unpark();
            if self.inner.closed.load(Ordering::SeqCst) {
                // Shutting down: the writer may have stopped before our message.
                self.inner.sweep();
            }
            let _ = done.recv();
        }
    }

    /// Writes out the queue (to the fallback what the output cannot take), and stops the
    /// writer; later events are dropped and counted. Also done when the last clone is dropped.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    fn send(&self, event: AuditEvent) {
        let inner = &self.inner;
        match inner.tx.try_send(Msg::Event(event)) {
            Ok(()) => {
                inner.counters.accepted.fetch_add(1, Ordering::Relaxed);
                if inner.closed.load(Ordering::SeqCst) {
                    inner.sweep();
                }
            }
            // Full cannot happen (the channel has room for every slot), but count it anyway.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                inner.counters.free_slots(1);
                inner.counters.on_drop("jsonl");
            }
        }
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
            self.closed.store(true, Ordering::SeqCst);
            handle.thread().unpark();
            let _ = self.tx.send(Msg::Shutdown);
            handle.thread().unpark();
            let _ = handle.join();
            self.sweep();
        }
    }

    /// After the writer stopped: counts events still in the channel as dropped (and answers
    /// flushes). Blocks while the writer is still writing out its last lines.
    fn sweep(&self) {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        while let Ok(msg) = rx.try_recv() {
            if let Msg::Event(_) = msg {
                self.counters.free_slots(1);
                self.counters.on_drop("jsonl");
            }
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
        // Taken even while unhealthy: the line is kept and retried, or goes to the fallback.
        if self.inner.counters.take_slot(self.inner.capacity) {
            self.send(event);
        } else {
            self.inner.counters.on_drop("jsonl");
        }
    }

    fn can_accept(&self) -> bool {
        let queued = self.inner.counters.queued.load(Ordering::Acquire);
        self.inner.healthy.load(Ordering::Acquire)
            && usize::try_from(queued).unwrap_or(0) < self.inner.capacity
    }

    fn try_reserve(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
            && !self.inner.closed.load(Ordering::Acquire)
            && self.inner.counters.take_slot(self.inner.capacity)
    }

    fn record_reserved(&self, event: AuditEvent) {
        self.send(event);
    }

    fn release_reservation(&self) {
        self.inner.counters.free_slots(1);
    }
}

/// Lines waiting to be written: the bytes, and where each line ends.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    ends: Vec<usize>,
    /// Bytes already handed to a plain writer whose flush has not succeeded yet.
    sent: usize,
}

impl Batch {
    fn lines(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn push(&mut self, event: &AuditEvent) -> io::Result<()> {
        let start = self.buf.len();
        if let Err(e) = serde_json::to_writer(&mut self.buf, event) {
            self.buf.truncate(start);
            return Err(e.into());
        }
        self.buf.push(b'\n');
        self.ends.push(self.buf.len());
        Ok(())
    }

    fn start_of(&self, line: usize) -> usize {
        match line.checked_sub(1) {
            Some(prev) => self.ends[prev],
            None => 0,
        }
    }

    fn line_len(&self, line: usize) -> u64 {
        (self.ends[line] - self.start_of(line)) as u64
    }

    /// Removes the first `n` lines.
    fn consume(&mut self, n: usize) {
        let Some(last) = n.checked_sub(1) else {
            return;
        };
        let cut = self.ends[last];
        self.buf.drain(..cut);
        self.ends.drain(..n);
        for end in &mut self.ends {
            *end -= cut;
        }
        self.sent = self.sent.saturating_sub(cut);
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
        self.sent = 0;
    }
}

/// Writes all of `buf`; on failure, says how many bytes went out before it.
fn write_counting(w: &mut dyn Write, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        match w.write(&buf[done..]) {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

enum Output {
    File(Rotating),
    Writer(Box<dyn Write + Send>),
}

impl Output {
    /// Writes the batch's lines in order; returns how many reached the output, and the error
    /// that stopped it.
    fn write(&mut self, batch: &mut Batch) -> (usize, Option<io::Error>) {
        match self {
            Output::File(r) => r.write(batch),
            Output::Writer(w) => {
                if batch.sent < batch.buf.len() {
                    if let Err((done, e)) = write_counting(w, &batch.buf[batch.sent..]) {
                        batch.sent += done;
                        return (0, Some(e));
                    }
                    batch.sent = batch.buf.len();
                }
                match w.flush() {
                    Ok(()) => (batch.lines(), None),
                    Err(e) => (0, Some(e)),
                }
            }
        }
    }
}

struct Rotating {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    /// The current file was moved away by a rotation that then failed to open a new one.
    moved: bool,
}

impl Rotating {
    fn write(&mut self, batch: &Batch) -> (usize, Option<io::Error>) {
        let n = batch.lines();
        let mut i = 0;
        while i < n {
            let first = batch.line_len(i);
            if (self.moved || (self.size > 0 && self.size.saturating_add(first) > self.max_bytes))
                && let Err(e) = self.rotate()
            {
                return (i, Some(e));
            }
            // As many lines as fit in this file (at least one), in one write.
            let mut j = i + 1;
            let mut size = self.size.saturating_add(first);
            while j < n && size.saturating_add(batch.line_len(j)) <= self.max_bytes {
                size += batch.line_len(j);
                j += 1;
            }
            let from = batch.start_of(i);
            match write_counting(&mut self.file, &batch.buf[from..batch.ends[j - 1]]) {
                Ok(()) => {
                    self.size = size;
                    i = j;
                }
                Err((done, e)) => {
                    let whole = batch.ends[i..j]
                        .iter()
                        .take_while(|&&end| end - from <= done)
                        .count();
                    let kept = batch.start_of(i + whole) - from;
                    if done > kept {
                        // Cut the half line off; if even that fails (not a regular file), the
                        // next line still starts on a new line after the retry.
                        let _ = self.file.set_len(self.size + kept as u64);
                    }
                    self.size += kept as u64;
                    return (i + whole, Some(e));
                }
            }
        }
        (n, None)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if !self.moved {
            if self.keep == 0 {
                match fs::remove_file(&self.path) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    other => other?,
                }
            } else {
                let _ = fs::remove_file(numbered(&self.path, self.keep));
                for i in (1..self.keep).rev() {
                    let from = numbered(&self.path, i);
                    if from.exists() {
                        fs::rename(&from, numbered(&self.path, i + 1))?;
                    }
                }
                match fs::rename(&self.path, numbered(&self.path, 1)) {
                    // Someone removed the file: there is nothing to move, open a new one.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    other => other?,
                }
            }
            self.moved = true;
        }
        self.file = open_append(&self.path)?;
        self.moved = false;
        self.size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
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
const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);

enum Control {
    Flush(mpsc::Sender<()>),
    Shutdown,
}

struct Writer {
    out: Output,
    fallback: Option<Box<dyn Write + Send>>,
    fallback_after: Duration,
    counters: Arc<Counters>,
    healthy: Arc<AtomicBool>,
    batch: Batch,
    failing_since: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Msg>) {
        let mut idle = IDLE_MIN;
        loop {
            let (took, control) = self.take(rx);
            let now = Instant::now();
            match control {
                Some(Control::Flush(ack)) => {
                    self.write_out(now, true, false);
                    let _ = ack.send(());
                    idle = IDLE_MIN;
                    continue;
                }
                Some(Control::Shutdown) => break,
                None => {}
            }
            if !self.batch.is_empty() && self.retry_at.is_none_or(|at| now >= at) {
                self.write_out(now, false, false);
            }
            if took {
                idle = IDLE_MIN;
                continue;
            }
            // Idle: nap instead of blocking in `recv`, so senders never pay for waking this
            // thread; control messages (flush, shutdown) unpark it at once.
            let nap = match self.retry_at {
                Some(at) if !self.batch.is_empty() => at.saturating_duration_since(now).min(idle),
                _ => idle,
            };
            std::thread::park_timeout(nap);
            idle = (idle * 2).min(IDLE_MAX);
        }
        // Take what was queued with or just after the shutdown message, then write it all out.
        let mut acks = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(Msg::Event(event)) => self.push(&event),
                Ok(Msg::Flush(ack)) => acks.push(ack),
                Ok(Msg::Shutdown) => {}
                Err(_) => break,
            }
        }
        self.write_out(Instant::now(), true, true);
        for ack in acks {
            let _ = ack.send(());
        }
    }

    /// Moves queued events into the batch: all of them while the output fails (their slots
    /// bound them), else up to a batch's worth. Stops at a control message.
    fn take(&mut self, rx: &Receiver<Msg>) -> (bool, Option<Control>) {
        let mut took = false;
        while self.failing_since.is_some() || self.batch.buf.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(Msg::Event(event)) => {
                    took = true;
                    self.push(&event);
                }
                Ok(Msg::Flush(ack)) => return (took, Some(Control::Flush(ack))),
                Ok(Msg::Shutdown) | Err(TryRecvError::Disconnected) => {
                    return (took, Some(Control::Shutdown));
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        (took, None)
    }

    fn push(&mut self, event: &AuditEvent) {
        if self.batch.push(event).is_err() {
            // Not expected (events always serialize); counted, never silent.
            self.counters.free_slots(1);
            self.counters.on_drop("jsonl");
        }
    }

    /// Writes the batch. On failure: unhealthy, retry later, and divert the batch to the
    /// fallback when `force`d or kept too long; `last` drops what no writer took.
    fn write_out(&mut self, now: Instant, force: bool, last: bool) {
        if self.batch.is_empty() {
            return;
        }
        let (done, error) = self.out.write(&mut self.batch);
        if done > 0 {
            self.counters
                .written
                .fetch_add(done as u64, Ordering::Relaxed);
            self.batch.consume(done);
            self.counters.free_slots(done);
        }
        match error {
            None => {
                self.failing_since = None;
                self.retry_at = None;
                self.backoff = RETRY_MIN;
                self.healthy.store(true, Ordering::Release);
            }
            Some(_) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                crate::metrics::write_error("jsonl");
                self.healthy.store(false, Ordering::Release);
                let since = *self.failing_since.get_or_insert(now);
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                if force || now.saturating_duration_since(since) >= self.fallback_after {
                    self.divert(last);
                }
            }
        }
    }

    /// Sends the kept lines to the fallback writer; without one, keeps them unless `last`.
    fn divert(&mut self, last: bool) {
        let n = self.batch.lines();
        let written = match &mut self.fallback {
            Some(f) => f
                .write_all(&self.batch.buf)
                .and_then(|()| f.flush())
                .is_ok(),
            None if !last => return,
            None => false,
        };
        if written {
            self.counters
                .fallback
                .fetch_add(n as u64, Ordering::Relaxed);
            crate::metrics::fallback("jsonl", n as u64);
        } else {
            self.counters.on_drops("jsonl", n as u64);
        }
        self.batch.clear();
        self.counters.free_slots(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::{Alert, AlertKind, KeyId, Timestamp};

    fn alert(i: usize) -> AuditEvent {
        AuditEvent::Alert(Alert {
            at: Timestamp::UNIX_EPOCH,
            kind: AlertKind::KeySuspended,
            key_id: KeyId::new("key_a"),
            project: "p".into(),
            reason: format!("r{i}"),
            message: String::new(),
        })
    }

    /// Bytes shared with the test.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Shared {
        fn reasons(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["reason"].as_str().unwrap().to_owned()
                })
                .collect()
        }
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer that fails with ENOSPC (the disk is full) while `fail` is set, after taking
    /// the first `partial` bytes of a write.
    #[derive(Clone, Default)]
    struct Flaky {
        fail: Arc<AtomicBool>,
        partial: Arc<Mutex<usize>>,
        out: Shared,
    }

    impl Flaky {
        fn failing() -> Self {
            let f = Flaky::default();
            f.fail.store(true, Ordering::SeqCst);
            f
        }
    }

    fn enospc() -> io::Error {
        io::Error::from_raw_os_error(28)
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut partial = self.partial.lock().unwrap();
            if *partial > 0 {
                let n = (*partial).min(buf.len());
                *partial = 0;
                return self.out.write(&buf[..n]);
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(enospc());
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(enospc());
            }
            Ok(())
        }
    }

    fn offered(stats: SinkStats) -> u64 {
        stats.written + stats.fallback + stats.dropped
    }

    #[test]
    fn failed_lines_are_not_counted_written_and_flush_sends_them_to_the_fallback() {
        let fallback = Shared::default();
        let sink = JsonlSink::writer_builder(Flaky::failing())
            .with_fallback(fallback.clone())
            .open()
            .unwrap();
        for i in 0..3 {
            sink.record_owned(alert(i));
        }
        sink.flush();
        let stats = sink.stats();
        assert_eq!((stats.written, stats.fallback, stats.dropped), (0, 3, 0));
        assert!(stats.write_errors >= 1);
        assert_eq!(stats.queue_len, 0);
        assert_eq!(fallback.reasons(), ["r0", "r1", "r2"]);
        assert!(!sink.can_accept(), "a failing sink is not healthy");
        assert!(!sink.try_reserve());
    }

    #[test]
    fn sink_is_healthy_again_only_after_a_write_succeeds_and_loses_nothing() {
        let out = Flaky::failing();
        let sink = JsonlSink::writer_builder(out.clone())
            .without_fallback()
            .open()
            .unwrap();
        sink.record_owned(alert(0));
        sink.record_owned(alert(1));
        sink.flush();
        let stats = sink.stats();
        assert_eq!((stats.written, stats.queue_len), (0, 2), "kept for a retry");
        assert!(!sink.can_accept());

        out.fail.store(false, Ordering::SeqCst);
        sink.flush();
        assert!(sink.can_accept(), "healthy after the retry succeeded");
        sink.record_owned(alert(2));
        sink.shutdown();
        let stats = sink.stats();
        assert_eq!((stats.written, stats.fallback, stats.dropped), (3, 0, 0));
        assert_eq!(out.out.reasons(), ["r0", "r1", "r2"], "each line once");
    }

    #[test]
    fn a_half_written_line_is_completed_on_retry_not_repeated() {
        let out = Flaky::failing();
        *out.partial.lock().unwrap() = 10;
        let sink = JsonlSink::writer_builder(out.clone())
            .without_fallback()
            .open()
            .unwrap();
        sink.record_owned(alert(0));
        sink.record_owned(alert(1));
        sink.flush();
        assert_eq!(sink.stats().written, 0);
        out.fail.store(false, Ordering::SeqCst);
        sink.shutdown();
        assert_eq!(out.out.reasons(), ["r0", "r1"]);
        assert_eq!(sink.stats().written, 2);
    }

    #[test]
    fn every_event_is_counted_once_when_the_output_never_recovers() {
        for with_fallback in [false, true] {
            let fallback = Shared::default();
            let builder = JsonlSink::writer_builder(Flaky::failing()).with_capacity(4);
            let builder = if with_fallback {
                builder.with_fallback(fallback.clone())
            } else {
                builder.without_fallback()
            };
            let sink = builder.open().unwrap();
            for i in 0..10 {
                sink.record_owned(alert(i));
            }
            sink.shutdown();
            sink.record_owned(alert(10));
            let stats = sink.stats();
            assert_eq!(offered(stats), 11, "{stats:?}");
            assert_eq!(stats.written, 0);
            assert_eq!(stats.queue_len, 0);
            if with_fallback {
                assert_eq!((stats.fallback, stats.dropped), (4, 7));
                assert_eq!(fallback.reasons().len(), 4);
            } else {
                assert_eq!((stats.fallback, stats.dropped), (0, 11));
            }
        }
    }

    #[test]
    fn dev_full_takes_no_line_and_everything_goes_to_the_fallback() {
        let fallback = Shared::default();
        let Ok(sink) = JsonlSink::builder("/dev/full")
            .with_fallback(fallback.clone())
            .open()
        else {
            return; // not Linux, or no /dev/full
        };
        assert!(sink.can_accept());
        for i in 0..5 {
            sink.record_owned(alert(i));
        }
        sink.flush();
        assert!(!sink.can_accept());
        sink.shutdown();
        let stats = sink.stats();
        assert_eq!((stats.written, stats.fallback, stats.dropped), (0, 5, 0));
        assert_eq!(fallback.reasons().len(), 5);
    }

    #[test]
    fn a_failed_rotation_is_a_write_failure_and_recovers() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("logs");
        fs::create_dir(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let fallback = Shared::default();
        let sink = JsonlSink::builder(&path)
            .with_max_bytes(0)
            .with_keep(3)
            .with_fallback(fallback.clone())
            .open()
            .unwrap();
        sink.record_owned(alert(0));
        sink.flush();
        assert_eq!(sink.stats().written, 1);

        // The directory goes away: the next line needs a rotation, which cannot open a file.
        fs::remove_dir_all(&dir).unwrap();
        sink.record_owned(alert(1));
        sink.flush();
        let stats = sink.stats();
        assert_eq!((stats.written, stats.fallback), (1, 1));
        assert!(stats.write_errors >= 1);
        assert!(!sink.can_accept());

        fs::create_dir(&dir).unwrap();
        sink.record_owned(alert(2));
        sink.flush();
        assert!(sink.can_accept());
        sink.shutdown();
        assert_eq!(sink.stats().written, 2);
        assert_eq!(fallback.reasons(), ["r1"]);
        assert!(fs::read_to_string(&path).unwrap().contains("\"r2\""));
    }

    /// Holds every write until released, so reservations stay taken.
    struct Gate(mpsc::Receiver<()>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_capacity() {
        const CAPACITY: usize = 16;
        let (release, gate) = mpsc::channel();
        let sink = JsonlSink::to_writer(Gate(gate), CAPACITY).unwrap();
        let taken: usize = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1_000).filter(|_| sink.try_reserve()).count()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(taken, CAPACITY);
        assert!(!sink.can_accept());
        assert!(!sink.try_reserve());
        for i in 0..taken {
            sink.record_reserved(alert(i));
        }
        for _ in 0..CAPACITY {
            let _ = release.send(());
        }
        drop(release);
        sink.shutdown();
        let stats = sink.stats();
        assert_eq!((stats.written, stats.dropped), (CAPACITY as u64, 0));
        assert_eq!(stats.max_queue_len, CAPACITY as u64);
    }
}
