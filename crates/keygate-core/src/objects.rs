//! Who owns what: the [`ObjectRegistry`] trait, the [`ObjectRecord`]s it keeps, and
//! [`MemoryRegistry`].
//!
//! A gateway that fronts one upstream account with one provider key sees every project's
//! files, batches, assistants, threads and stored responses through that key. The registry
//! is how keygate tells them apart: when a response creates an object, the scope layer
//! records its id with the project of the key that made it; a request that names an object
//! (in its path or its body) is let through only when the object belongs to the caller's
//! project, and answered 404 otherwise, exactly as if it did not exist.
//!
//! The registry also keeps what a later request needs to check models it does not name: an
//! assistant's model (for runs), the models a batch input file's requests name (for
//! batches), a response's model (for a response continuing it).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// What kind of object a record is: OpenAI's `object` field, for the objects keygate owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ObjectKind {
    /// `file`.
    File,
    /// `upload` (a file uploaded in parts).
    Upload,
    /// `batch`.
    Batch,
    /// `assistant`.
    Assistant,
    /// `thread`.
    Thread,
    /// `thread.message`.
    Message,
    /// `thread.run`.
    Run,
    /// `vector_store`.
    VectorStore,
    /// `vector_store.file_batch`.
    VectorStoreFileBatch,
    /// `fine_tuning.job`.
    FineTuningJob,
    /// A fine-tuning checkpoint (`ftckpt_…`): never created by a response keygate sees, so
    /// only an import makes one usable.
    FineTuningCheckpoint,
    /// `response` (a stored response).
    Response,
    /// `chat.completion` (a stored chat completion).
    ChatCompletion,
    /// A fine-tuned model (`ft:…`), recorded when its fine-tuning job is seen to have made
    /// it: only its project may use, retrieve or delete it.
    Model,
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 14] = [
        ObjectKind::File,
        ObjectKind::Upload,
        ObjectKind::Batch,
        ObjectKind::Assistant,
        ObjectKind::Thread,
        ObjectKind::Message,
        ObjectKind::Run,
        ObjectKind::VectorStore,
        ObjectKind::VectorStoreFileBatch,
        ObjectKind::FineTuningJob,
        ObjectKind::FineTuningCheckpoint,
        ObjectKind::Response,
        ObjectKind::ChatCompletion,
        ObjectKind::Model,
    ];

    /// The kind of an object whose `object` field is `object` (`"file"`, `"thread.run"`).
    pub fn from_object_type(object: &str) -> Option<ObjectKind> {
        Some(match object {
            "file" => ObjectKind::File,
            "upload" => ObjectKind::Upload,
            "batch" => ObjectKind::Batch,
            "assistant" => ObjectKind::Assistant,
            "thread" => ObjectKind::Thread,
            "thread.message" => ObjectKind::Message,
            "thread.run" => ObjectKind::Run,
            "vector_store" => ObjectKind::VectorStore,
            "vector_store.file_batch" => ObjectKind::VectorStoreFileBatch,
            "fine_tuning.job" => ObjectKind::FineTuningJob,
            "fine_tuning.job.checkpoint" => ObjectKind::FineTuningCheckpoint,
            "response" => ObjectKind::Response,
            "chat.completion" => ObjectKind::ChatCompletion,
            "model" => ObjectKind::Model,
            _ => return None,
        })
    }

    /// The name used in the store and the CLI (`file`, `thread_message`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::File => "file",
            ObjectKind::Upload => "upload",
            ObjectKind::Batch => "batch",
            ObjectKind::Assistant => "assistant",
            ObjectKind::Thread => "thread",
            ObjectKind::Message => "message",
            ObjectKind::Run => "run",
            ObjectKind::VectorStore => "vector_store",
            ObjectKind::VectorStoreFileBatch => "vector_store_file_batch",
            ObjectKind::FineTuningJob => "fine_tuning_job",
            ObjectKind::FineTuningCheckpoint => "fine_tuning_checkpoint",
            ObjectKind::Response => "response",
            ObjectKind::ChatCompletion => "chat_completion",
            ObjectKind::Model => "model",
        }
    }

    /// The kind named `name` ([`as_str`](ObjectKind::as_str)).
    pub fn parse(name: &str) -> Option<ObjectKind> {
        ObjectKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object keygate knows: who owns it, and what later requests need to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ObjectRecord {
    /// The upstream's id (`file-abc`, `asst_abc`).
    pub id: String,
    /// What it is.
    pub kind: ObjectKind,
    /// The project that owns it: the only one whose keys can reach it.
    pub project: String,
    /// The key that created it (empty when imported).
    pub key_id: String,
    /// When keygate recorded it (Unix seconds).
    pub created_at: u64,
    /// The model the object does its work with: an assistant's, a run's, a fine-tuning job's
    /// base model, a stored response's or chat completion's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// For a batch input file: the models its requests name (sorted, each once), as keygate
    /// read them at upload. `None`: not read (then a batch of it cannot be verified for a key
    /// with model rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
}

impl ObjectRecord {
    /// A record of `id` of `kind`, owned by `project`, created by key `key_id`.
    pub fn new(
        id: impl Into<String>,
        kind: ObjectKind,
        project: impl Into<String>,
        key_id: impl Into<String>,
        created_at: u64,
    ) -> Self {
        ObjectRecord {
            id: id.into(),
            kind,
            project: project.into(),
            key_id: key_id.into(),
            created_at,
            model: None,
            models: None,
        }
    }

    /// The same record with `model`.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The same record with the verified models of a batch input file.
    #[must_use]
    pub fn with_models(mut self, models: Vec<String>) -> Self {
        self.models = Some(models);
        self
    }
}

/// A registry could not answer or record. The scope layer refuses the request (503); it
/// never lets it pass.
#[derive(Debug, Clone, thiserror::Error)]
#[error("object registry unavailable: {message}")]
pub struct RegistryError {
    message: Arc<str>,
}

impl RegistryError {
    /// An error with a message (never anything secret).
    pub fn new(message: impl Into<Arc<str>>) -> Self {
        RegistryError {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// What registry calls return: boxed, so a layer holds any registry as
/// `Arc<dyn ObjectRegistry>`. Calls are made only for requests that name or create objects.
pub type RegistryFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, RegistryError>> + Send + 'a>>;

/// Records which project owns each object created through keygate, and answers for it.
///
/// Implementations: [`MemoryRegistry`] (tests, a gateway without a store), the SQLite
/// registry of `keygate-store` (the embedded default), and, for many replicas, PostgreSQL.
/// [`get`](ObjectRegistry::get) is on the request path of every request that names an
/// object: from memory, or one indexed read. A [`record`](ObjectRegistry::record) that
/// resolved is seen by every later `get` of the same process.
pub trait ObjectRegistry: Send + Sync + 'static {
    /// The record of `id`, if keygate recorded (or imported) it.
    fn get<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, Option<Arc<ObjectRecord>>>;

    /// Records `objects` (a new object, or a changed one: an assistant's new model).
    fn record(&self, objects: Vec<ObjectRecord>) -> RegistryFuture<'_, ()>;

    /// Forgets `id` (the object was deleted upstream). Forgetting an unknown id is no error.
    fn remove<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, ()>;
}

impl<R: ObjectRegistry + ?Sized> ObjectRegistry for Arc<R> {
    fn get<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, Option<Arc<ObjectRecord>>> {
        (**self).get(id)
    }

    fn record(&self, objects: Vec<ObjectRecord>) -> RegistryFuture<'_, ()> {
        (**self).record(objects)
    }

    fn remove<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, ()> {
        (**self).remove(id)
    }
}

/// An [`ObjectRegistry`] in this process's memory: gone on restart (then every object is
/// refused until imported again). For tests and for gateways without a store.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    objects: Mutex<HashMap<String, Arc<ObjectRecord>>>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        MemoryRegistry::default()
    }

    /// How many objects it holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record of `id`, at once.
    pub fn get_now(&self, id: &str) -> Option<Arc<ObjectRecord>> {
        self.lock().get(id).cloned()
    }

    /// Records `objects` at once.
    pub fn record_now(&self, objects: impl IntoIterator<Item = ObjectRecord>) {
        let mut map = self.lock();
        for o in objects {
            map.insert(o.id.clone(), Arc::new(o));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ObjectRecord>>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ObjectRegistry for MemoryRegistry {
    fn get<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, Option<Arc<ObjectRecord>>> {
        let found = self.get_now(id);
        Box::pin(async move { Ok(found) })
    }

    fn record(&self, objects: Vec<ObjectRecord>) -> RegistryFuture<'_, ()> {
        self.record_now(objects);
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, id: &'a str) -> RegistryFuture<'a, ()> {
        self.lock().remove(id);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in ObjectKind::ALL {
            assert_eq!(ObjectKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(
            ObjectKind::from_object_type("thread.run"),
            Some(ObjectKind::Run)
        );
        assert_eq!(ObjectKind::from_object_type("list"), None);
    }

    #[tokio::test]
    async fn the_memory_registry_records_answers_and_forgets() {
        let r = MemoryRegistry::new();
        assert!(r.get("file-1").await.unwrap().is_none());
        r.record(vec![
            ObjectRecord::new("file-1", ObjectKind::File, "a", "key_1", 5)
                .with_models(vec!["gpt-4o".into()]),
            ObjectRecord::new("asst_1", ObjectKind::Assistant, "b", "key_2", 6)
                .with_model("gpt-4o-mini"),
        ])
        .await
        .unwrap();
        let file = r.get("file-1").await.unwrap().unwrap();
        assert_eq!(file.project, "a");
        assert_eq!(file.models.as_deref(), Some(&["gpt-4o".to_owned()][..]));
        let asst = r.get("asst_1").await.unwrap().unwrap();
        assert_eq!(asst.model.as_deref(), Some("gpt-4o-mini"));
        r.remove("file-1").await.unwrap();
        assert!(r.get("file-1").await.unwrap().is_none());
        assert_eq!(r.len(), 1);
    }
}
