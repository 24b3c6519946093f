//! Task and handler components, and how they are prepared: compiled once per distinct bytes
//! (through the artifact store when there is one, or found by the file index without reading
//! the file), linked against the host, checked against their world, and refused at load when
//! they can never fit the pool.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Component, InstancePre};

use super::admission::Needs;
use super::bindings::TaskPre;
use super::bindings::flow::FlowPre;
use super::bindings::handler::HandlerPre;
use super::component_file::{component_binary, read};
use super::ending::error_chain;
use super::file_index::FileIdentity;
use super::{ComponentCell, LoadError, LoadEvent, LoadInfo, LoadSource, RunState, Sandbox};

/// A component compiled and linked against the host, shared by every kind of component made
/// from the same bytes.
pub(super) struct Prepared {
    name: String,
    digest: blake3::Hash,
    pre: InstancePre<RunState>,
    /// What one run takes from the pool.
    pub(super) needs: Needs,
    load: LoadInfo,
}

/// A task component ready to run: compiled, linked against the host, and checked against the
/// `task` world. Cheap to clone.
#[derive(Clone)]
pub struct TaskComponent(pub(super) Arc<(Arc<Prepared>, TaskPre<RunState>)>);

/// A state-handler component ready to run, checked against the `handler` world. Cheap to clone.
#[derive(Clone)]
pub struct HandlerComponent(pub(super) Arc<(Arc<Prepared>, HandlerPre<RunState>)>);

/// A flow body ready to run, checked against the `flow` world. Cheap to clone.
#[derive(Clone)]
pub struct FlowComponent(pub(super) Arc<(Arc<Prepared>, FlowPre<RunState>)>);

macro_rules! component_accessors {
    ($ty:ident) => {
        impl $ty {
            /// The name it was loaded under (its path, usually).
            pub fn name(&self) -> &str {
                &self.0.0.name
            }

            /// blake3 of the component's bytes, in hex.
            pub fn digest(&self) -> String {
                self.0.0.digest.to_hex().to_string()
            }

            /// How it was first loaded in this process.
            pub fn load_info(&self) -> LoadInfo {
                self.0.0.load
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("name", &self.name())
                    .field("digest", &self.digest())
                    .field("load", &self.load_info())
                    .finish()
            }
        }
    };
}

component_accessors!(TaskComponent);
component_accessors!(HandlerComponent);
component_accessors!(FlowComponent);

impl Sandbox {
    /// Load the component in the file at `path` (binary, or WebAssembly text). With an artifact
    /// directory, a file loaded before and unchanged since is not read: the directory's file
    /// index gives its digest, and the precompiled artifact is mapped ([`LoadSource::Indexed`]).
    pub async fn load_file(&self, path: &Path) -> Result<TaskComponent, LoadError> {
        let prepared = self.prepared_file(path).await?;
        self.task_component(prepared)
    }

    /// Load a task component from its bytes (binary, or WebAssembly text). The same bytes are
    /// prepared once per process and compiled once per artifact directory; compiling happens on
    /// a blocking thread, off the async runtime.
    pub async fn load_bytes(&self, name: &str, bytes: Vec<u8>) -> Result<TaskComponent, LoadError> {
        let prepared = self.prepared(name, bytes).await?;
        self.task_component(prepared)
    }

    fn task_component(&self, prepared: Arc<Prepared>) -> Result<TaskComponent, LoadError> {
        let pre = TaskPre::new(prepared.pre.clone()).map_err(|e| LoadError::Incompatible {
            name: prepared.name.clone(),
            detail: format!(
                "it must export `run: func(input: string) -> result<string, signal>` \
                 (world `sluice:task/task@0.1.0`): {}",
                error_chain(&e)
            ),
        })?;
        Ok(TaskComponent(Arc::new((prepared, pre))))
    }

    /// Load the state-handler component in the file at `path` (as [`load_file`](Self::load_file)
    /// does).
    pub async fn load_handler_file(&self, path: &Path) -> Result<HandlerComponent, LoadError> {
        let prepared = self.prepared_file(path).await?;
        let pre = HandlerPre::new(prepared.pre.clone()).map_err(|e| LoadError::Incompatible {
            name: prepared.name.clone(),
            detail: format!(
                "a state handler must export `handle: func(task: string, old: state, new: state) \
                 -> option<state>` (world `sluice:task/handler@0.1.0`): {}",
                error_chain(&e)
            ),
        })?;
        Ok(HandlerComponent(Arc::new((prepared, pre))))
    }

    /// Load the flow body in the file at `path` (as [`load_file`](Self::load_file) does).
    pub async fn load_flow_file(&self, path: &Path) -> Result<FlowComponent, LoadError> {
        let prepared = self.prepared_file(path).await?;
        let pre = FlowPre::new(prepared.pre.clone()).map_err(|e| LoadError::Incompatible {
            name: prepared.name.clone(),
            detail: format!(
                "a flow body must export `run: func(parameters: string) -> result<string, \
                 signal>` (world `sluice:task/flow@0.1.0`): {}",
                error_chain(&e)
            ),
        })?;
        Ok(FlowComponent(Arc::new((prepared, pre))))
    }

    /// The prepared component in the file at `path`: through the file index when it knows the
    /// file as it is now and its artifact loads, otherwise by reading and hashing the file (and
    /// then recording it in the index).
    async fn prepared_file(&self, path: &Path) -> Result<Arc<Prepared>, LoadError> {
        let name = path.display().to_string();
        if self.0.index.is_none() {
            return self
                .prepared(&name, read(path, self.0.max_component_bytes).await?.bytes)
                .await;
        }
        let this = self.clone();
        let owned = path.to_owned();
        let indexed = tokio::task::spawn_blocking(move || {
            let index = this.0.index.as_ref()?;
            index.lookup(&FileIdentity::of_path(&owned)?)
        })
        .await
        .ok()
        .flatten();
        if let Some(digest) = indexed {
            match self.prepared_from_artifact(&name, digest).await {
                Ok(prepared) => return Ok(prepared),
                Err(IndexedLoad::Failed(e)) => return Err(e),
                Err(IndexedLoad::Miss) => {}
            }
        }
        let file = read(path, self.0.max_component_bytes).await?;
        let prepared = self.prepared(&name, file.bytes).await?;
        if let Some(identity) = file.identity {
            // Best effort, and off the async runtime: a failure is a miss next time.
            let this = self.clone();
            let digest = prepared.digest;
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(index) = &this.0.index {
                    index.record(&identity, &digest);
                }
            })
            .await;
        }
        Ok(prepared)
    }

    /// The prepared component for `digest`, shared in this process, or loaded from its artifact
    /// without the component's bytes. A missing or unusable artifact is a miss.
    async fn prepared_from_artifact(
        &self,
        name: &str,
        digest: blake3::Hash,
    ) -> Result<Arc<Prepared>, IndexedLoad> {
        let cell = self.cell(digest);
        cell.get_or_try_init(|| {
            let this = self.clone();
            let name = name.to_owned();
            async move {
                tokio::task::spawn_blocking(move || this.prepare_indexed(name, digest))
                    .await
                    .map_err(|e| {
                        IndexedLoad::Failed(LoadError::Sandbox(format!(
                            "the loader thread failed: {e}"
                        )))
                    })?
            }
        })
        .await
        .cloned()
    }

    fn cell(&self, digest: blake3::Hash) -> ComponentCell {
        let mut map = self.0.components.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(digest).or_default().clone()
    }

    async fn prepared(&self, name: &str, bytes: Vec<u8>) -> Result<Arc<Prepared>, LoadError> {
        let bytes = component_binary(name, bytes)?;
        let digest = blake3::hash(&bytes);
        let cell = self.cell(digest);
        cell.get_or_try_init(|| {
            let this = self.clone();
            let name = name.to_owned();
            async move {
                tokio::task::spawn_blocking(move || this.prepare(name, &bytes, digest))
                    .await
                    .map_err(|e| LoadError::Sandbox(format!("the compiler thread failed: {e}")))?
            }
        })
        .await
        .cloned()
    }

    /// Load the artifact for `digest` and link it; no artifact (or an unusable one, which the
    /// store removes) is a miss.
    fn prepare_indexed(
        &self,
        name: String,
        digest: blake3::Hash,
    ) -> Result<Arc<Prepared>, IndexedLoad> {
        let started = Instant::now();
        let store = self.0.artifacts.as_ref().ok_or(IndexedLoad::Miss)?;
        let component = store
            .load(&self.0.engine, &digest, unfit_for_pool)
            .map_err(|e| IndexedLoad::Failed(exceeds_sandbox(&name, &e)))?
            .ok_or(IndexedLoad::Miss)?;
        self.link(name, digest, &component, LoadSource::Indexed, started)
            .map_err(IndexedLoad::Failed)
    }

    fn prepare(
        &self,
        name: String,
        bytes: &[u8],
        digest: blake3::Hash,
    ) -> Result<Arc<Prepared>, LoadError> {
        let started = Instant::now();
        let engine = &self.0.engine;
        let load_err = |e: wasmtime::Error| match unfit_for_pool(&e) {
            true => exceeds_sandbox(&name, &e),
            false => LoadError::Compile {
                name: name.clone(),
                detail: error_chain(&e),
            },
        };
        let (component, source) = match &self.0.artifacts {
            None => (
                self.compile(&name, bytes.len() as u64, || {
                    Component::new(engine, bytes).map_err(load_err)
                })?,
                LoadSource::Compiled,
            ),
            Some(store) => match store.load(engine, &digest, unfit_for_pool) {
                Err(e) => return Err(exceeds_sandbox(&name, &e)),
                Ok(Some(c)) => (c, LoadSource::Precompiled),
                Ok(None) => {
                    let c = self.compile(&name, bytes.len() as u64, || {
                        let artifact = engine.precompile_component(bytes).map_err(load_err)?;
                        // Stored even when the component turns out not to fit the pool: the
                        // next load refuses it from the artifact, without compiling again.
                        let path =
                            store
                                .store(&digest, &artifact)
                                .map_err(|source| LoadError::Store {
                                    path: store.dir().to_owned(),
                                    source,
                                })?;
                        store
                            .load(engine, &digest, unfit_for_pool)
                            .map_err(|e| exceeds_sandbox(&name, &e))?
                            .ok_or_else(|| {
                                LoadError::Sandbox(format!(
                                    "the artifact just written to `{}` could not be loaded",
                                    path.display()
                                ))
                            })
                    })?;
                    (c, LoadSource::Compiled)
                }
            },
        };
        self.link(name, digest, &component, source, started)
    }

    /// Run `compile` on the component binary of `bytes` bytes, reporting it to the load events
    /// (its end even if the compiler panics).
    fn compile(
        &self,
        name: &str,
        bytes: u64,
        compile: impl FnOnce() -> Result<Component, LoadError>,
    ) -> Result<Component, LoadError> {
        tracing::info!(component = %name, bytes, "compiling");
        self.report(LoadEvent::Compiling {
            name: name.to_owned(),
            bytes,
        });
        let mut end = CompileEnd {
            sandbox: self,
            name,
            bytes,
            started: Instant::now(),
            ok: false,
        };
        let compiled = compile();
        end.ok = compiled.is_ok();
        compiled
    }

    fn report(&self, event: LoadEvent) {
        if let Some(events) = &self.0.load_events {
            // A receiver that has gone away is not the sandbox's problem.
            let _ = events.send(event);
        }
    }

    fn link(
        &self,
        name: String,
        digest: blake3::Hash,
        component: &Component,
        source: LoadSource,
        started: Instant,
    ) -> Result<Arc<Prepared>, LoadError> {
        let pre =
            self.0
                .linker
                .instantiate_pre(component)
                .map_err(|e| LoadError::Incompatible {
                    name: name.clone(),
                    detail: error_chain(&e),
                })?;
        // Known statically for every component whose core modules are its own (a task cannot
        // import core modules); otherwise reserve the most a component may have.
        let needs = component
            .resources_required()
            .map_or(self.0.max_needs, |r| Needs {
                memories: r.num_memories,
                tables: r.num_tables,
            });
        Ok(Arc::new(Prepared {
            name,
            digest,
            pre,
            needs,
            load: LoadInfo {
                source,
                duration: started.elapsed(),
            },
        }))
    }
}

/// Reports the end of a compile when dropped: `Compiled` if it succeeded, `CompileFailed`
/// otherwise (an error, or a panic unwinding through it).
struct CompileEnd<'a> {
    sandbox: &'a Sandbox,
    name: &'a str,
    bytes: u64,
    started: Instant,
    ok: bool,
}

impl Drop for CompileEnd<'_> {
    fn drop(&mut self) {
        let (name, bytes, elapsed) = (self.name.to_owned(), self.bytes, self.started.elapsed());
        self.sandbox.report(if self.ok {
            LoadEvent::Compiled {
                name,
                bytes,
                elapsed,
            }
        } else {
            LoadEvent::CompileFailed {
                name,
                bytes,
                elapsed,
            }
        });
    }
}

/// Why a load through the file index did not give a component.
enum IndexedLoad {
    /// No usable artifact: read and hash the file instead.
    Miss,
    /// The artifact loaded but the component cannot be used; reading the file would not help.
    Failed(LoadError),
}

/// Whether loading failed because the component does not fit the pooling allocator's
/// per-component or per-module limits (wasmtime's `validate_component` and `validate_module`
/// errors all say so), as opposed to an unusable artifact or a compile error.
fn unfit_for_pool(e: &wasmtime::Error) -> bool {
    error_chain(e).contains("pooling allocator")
}

fn exceeds_sandbox(name: &str, e: &wasmtime::Error) -> LoadError {
    LoadError::ExceedsSandbox {
        name: name.to_owned(),
        detail: error_chain(e),
    }
}
