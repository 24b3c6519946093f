//! Outbound TCP for one run (`wasi:sockets`): connections only to what the run's TCP grants
//! allow, and name lookups only of the names they grant. wasmtime-wasi checks every socket
//! address through [`TcpAllow::check`]; its own `ip-name-lookup` is replaced in the linker by
//! [`GrantedLookup`], which refuses an ungranted name before any DNS query (so a guest cannot
//! leak data through the names it looks up) and remembers what a granted name resolved to: a
//! name grant allows connecting to exactly those addresses, in this run. No listening, no UDP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{
    Host, HostResolveAddressStream, ResolveAddressStream,
};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddress};
use wasmtime_wasi::p2::{DynPollable, Network, SocketError};
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsCtxView};

use super::capture::SharedSink;
use super::outcome::{LogLevel, LogSource};
use crate::grants::{TcpGrant, TcpHost};

/// A run's TCP grants, and the addresses its granted name lookups gave.
pub(super) struct TcpAllow {
    grants: Arc<[TcpGrant]>,
    /// (address, index of the name grant it was looked up for).
    resolved: Mutex<Vec<(IpAddr, usize)>>,
    /// Lookups in progress: resource → index of the name grant.
    lookups: Mutex<HashMap<u32, usize>>,
    logs: SharedSink,
}

impl TcpAllow {
    pub(super) fn new(grants: Arc<[TcpGrant]>, logs: SharedSink) -> Self {
        Self {
            grants,
            resolved: Mutex::default(),
            lookups: Mutex::default(),
            logs,
        }
    }

    fn log(&self, message: String) {
        super::capture::lock(&self.logs).push(LogSource::Sluice, LogLevel::Warn, message);
    }

    /// Whether `addr` may be used for `use_`: connecting to a granted address (or one a granted
    /// name resolved to in this run) on a granted port, and the implicit bind to the unspecified
    /// address that a connect makes first. Everything else is refused and logged.
    pub(super) fn check(&self, addr: SocketAddr, use_: SocketAddrUse) -> bool {
        let allowed = match use_ {
            SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
            SocketAddrUse::TcpConnect => {
                let resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
                self.grants.iter().enumerate().any(|(i, g)| {
                    g.allows_port(addr.port())
                        && match &g.host {
                            TcpHost::Ip(ip) => *ip == addr.ip(),
                            TcpHost::Name(_) => resolved.contains(&(addr.ip(), i)),
                        }
                })
            }
            _ => false,
        };
        if !allowed && !matches!(use_, SocketAddrUse::TcpBind) {
            self.log(format!(
                "TCP denied: {use_:?} {addr}: {}",
                if self.grants.is_empty() {
                    "the task is granted no TCP".to_owned()
                } else {
                    let list: Vec<String> = self.grants.iter().map(ToString::to_string).collect();
                    format!("not granted (grants: {})", list.join(", "))
                }
            ));
        }
        allowed
    }

    /// The index of the name grant for `name`, if any.
    fn name_grant(&self, name: &str) -> Option<usize> {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        self.grants
            .iter()
            .position(|g| g.host == TcpHost::Name(name.clone()))
    }
}

/// The `wasi:sockets/ip-name-lookup` Sluice links instead of wasmtime-wasi's.
pub(crate) struct GrantedLookup;

impl HasData for GrantedLookup {
    type Data<'a> = GrantedLookupView<'a>;
}

/// wasmtime-wasi's lookup, and the run's TCP grants.
pub(crate) struct GrantedLookupView<'a> {
    pub(super) inner: WasiSocketsCtxView<'a>,
    pub(super) allow: &'a TcpAllow,
}

impl wasmtime_wasi::p2::bindings::sockets::network::Host for GrantedLookupView<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        self.inner.convert_error_code(error)
    }

    fn network_error_code(
        &mut self,
        err: Resource<wasmtime_wasi::p2::bindings::sockets::network::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        self.inner.network_error_code(err)
    }
}

impl wasmtime_wasi::p2::bindings::sockets::network::HostNetwork for GrantedLookupView<'_> {
    fn drop(&mut self, this: Resource<Network>) -> wasmtime::Result<()> {
        wasmtime_wasi::p2::bindings::sockets::network::HostNetwork::drop(&mut self.inner, this)
    }
}

impl Host for GrantedLookupView<'_> {
    fn resolve_addresses(
        &mut self,
        network: Resource<Network>,
        name: String,
    ) -> Result<Resource<ResolveAddressStream>, SocketError> {
        // An address needs no query: wasmtime-wasi answers it without one.
        let grant = if name.parse::<IpAddr>().is_ok()
            || name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .is_some_and(|n| n.parse::<IpAddr>().is_ok())
        {
            None
        } else {
            match self.allow.name_grant(&name) {
                Some(i) => Some(i),
                None => {
                    self.allow.log(format!(
                        "name lookup denied: {name}: not a granted TCP host"
                    ));
                    return Err(ErrorCode::PermanentResolverFailure.into());
                }
            }
        };
        let stream = Host::resolve_addresses(&mut self.inner, network, name)?;
        if let Some(i) = grant {
            self.allow
                .lookups
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(stream.rep(), i);
        }
        Ok(stream)
    }
}

impl HostResolveAddressStream for GrantedLookupView<'_> {
    fn resolve_next_address(
        &mut self,
        resource: Resource<ResolveAddressStream>,
    ) -> Result<Option<IpAddress>, SocketError> {
        let rep = resource.rep();
        let next = HostResolveAddressStream::resolve_next_address(&mut self.inner, resource)?;
        if let Some(address) = &next {
            let grant = self
                .allow
                .lookups
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&rep)
                .copied();
            if let Some(i) = grant {
                let ip = match *address {
                    IpAddress::Ipv4((a, b, c, d)) => IpAddr::from([a, b, c, d]),
                    IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
                        IpAddr::from([a, b, c, d, e, f, g, h])
                    }
                };
                self.allow
                    .resolved
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((ip, i));
            }
        }
        Ok(next)
    }

    fn subscribe(
        &mut self,
        resource: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        HostResolveAddressStream::subscribe(&mut self.inner, resource)
    }

    fn drop(&mut self, resource: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
        self.allow
            .lookups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&resource.rep());
        HostResolveAddressStream::drop(&mut self.inner, resource)
    }
}
