//! The host side of the `media` interface (`wit/media.wit`): the bindings
//! of the `hyperty-media` world's `media` import, and the handles of one
//! instance's peer connections.

use std::sync::Arc;

use anyhow::{Result, anyhow};
use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable};

use super::{DomainMedia, MediaError, PeerConnection};
use crate::address::Address;
use crate::bus::Bus;
use crate::policy::Descriptor;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "hyperty-media",
        // As the hyperty world's (`sandbox::glue`), whose types it uses.
        ownership: Borrowing { duplicate_if_necessary: true },
        with: {
            "rethink:hyperty/types": crate::sandbox::glue::bindings::rethink::hyperty::types,
            "rethink:hyperty/bus": crate::sandbox::glue::bindings::rethink::hyperty::bus,
            "rethink:hyperty/registry": crate::sandbox::glue::bindings::rethink::hyperty::registry,
            "rethink:hyperty/syncher": crate::sandbox::glue::bindings::rethink::hyperty::syncher,
            "rethink:hyperty/log": crate::sandbox::glue::bindings::rethink::hyperty::log,
            "rethink:hyperty/media.peer-connection": crate::media::PeerConnection,
        },
    });
}

use bindings::rethink::hyperty::media as wit;

/// Adds the `media` import to a hyperty linker; `get` finds an instance's
/// [`MediaState`] in its store data.
pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>, get: fn(&mut T) -> &mut MediaState) -> Result<()> {
    wit::add_to_linker::<T, HasSelf<MediaState>>(linker, get).map_err(|e| anyhow!("{e:#}"))
}

/// What one hyperty instance's `media` calls need: its own handle table,
/// its domain's media, and where its events go. Dropped with the store,
/// which closes every connection it still holds.
pub(crate) struct MediaState {
    table: ResourceTable,
    domain: Arc<DomainMedia>,
    owner: Address,
    descriptor: Arc<Descriptor>,
    bus: Bus,
}

impl MediaState {
    pub fn new(domain: Arc<DomainMedia>, owner: Address, descriptor: Arc<Descriptor>, bus: Bus) -> MediaState {
        MediaState { table: ResourceTable::new(), domain, owner, descriptor, bus }
    }

    fn conn(&self, pc: &Resource<PeerConnection>) -> Result<&super::Conn, MediaError> {
        self.table.get(pc).map(|p| &*p.conn).map_err(|e| MediaError::Closed(format!("no such peer connection: {e}")))
    }

    /// Asks the policies whether `conn` may accept the remote SDP of the
    /// peer named `remote` (`media-accept`), with its checked identity.
    fn authorize_accept(&self, conn: &super::Conn, remote: Option<&str>) -> Result<(), MediaError> {
        let descriptor = remote.and_then(|r| Address::parse(r).ok()).and_then(|r| self.bus.descriptor_of(&r));
        let identity = conn.remote_identity();
        let remote = remote.map(|r| (r, descriptor.as_deref()));
        self.domain.authorize("media-accept", &self.owner, &self.descriptor, &conn.address, remote, identity.as_ref())
    }
}

impl wit::Host for MediaState {}

impl wit::HostPeerConnection for MediaState {
    fn open(&mut self, remote: Option<String>) -> Result<Resource<PeerConnection>, wit::MediaError> {
        let pc = self.domain.open(&self.owner, &self.descriptor, &self.bus, remote.as_deref())?;
        self.table.push(pc).map_err(|e| wit::MediaError::LimitReached(format!("handles: {e}")))
    }

    fn address(&mut self, pc: Resource<PeerConnection>) -> String {
        self.conn(&pc).map(|c| c.address.to_string()).unwrap_or_default()
    }

    fn fingerprint(&mut self, pc: Resource<PeerConnection>) -> String {
        self.conn(&pc).map(|c| c.fingerprint.clone()).unwrap_or_default()
    }

    fn identity_assertion(&mut self, pc: Resource<PeerConnection>) -> Result<String, wit::MediaError> {
        Ok(self.domain.identity_assertion(self.conn(&pc)?, &self.descriptor)?)
    }

    fn set_remote_identity(&mut self, pc: Resource<PeerConnection>, assertion: String) -> Result<String, wit::MediaError> {
        Ok(self.domain.set_remote_identity(self.conn(&pc)?, &assertion)?)
    }

    fn create_offer(&mut self, pc: Resource<PeerConnection>) -> Result<String, wit::MediaError> {
        Ok(self.conn(&pc)?.create_offer()?)
    }

    fn accept_offer(&mut self, pc: Resource<PeerConnection>, sdp: String, remote: Option<String>) -> Result<String, wit::MediaError> {
        let conn = self.conn(&pc)?;
        self.authorize_accept(conn, remote.as_deref())?;
        Ok(conn.accept_offer(&sdp)?)
    }

    fn accept_answer(&mut self, pc: Resource<PeerConnection>, sdp: String) -> Result<(), wit::MediaError> {
        let conn = self.conn(&pc)?;
        self.authorize_accept(conn, conn.remote.as_deref())?;
        Ok(conn.accept_answer(&sdp)?)
    }

    fn add_remote_candidate(&mut self, pc: Resource<PeerConnection>, candidate: String) -> Result<(), wit::MediaError> {
        Ok(self.conn(&pc)?.add_remote_candidate(&candidate)?)
    }

    fn local_candidates(&mut self, pc: Resource<PeerConnection>) -> Vec<String> {
        self.conn(&pc).map(super::Conn::local_candidates).unwrap_or_default()
    }

    fn open_channel(&mut self, pc: Resource<PeerConnection>, label: String, ordered: bool) -> Result<u32, wit::MediaError> {
        Ok(self.conn(&pc)?.open_channel(label, ordered)?)
    }

    fn send_text(&mut self, pc: Resource<PeerConnection>, channel: u32, text: String) -> Result<(), wit::MediaError> {
        Ok(self.conn(&pc)?.send(channel, false, text.as_bytes())?)
    }

    fn send_bytes(&mut self, pc: Resource<PeerConnection>, channel: u32, data: Vec<u8>) -> Result<(), wit::MediaError> {
        Ok(self.conn(&pc)?.send(channel, true, &data)?)
    }

    fn add_track(&mut self, pc: Resource<PeerConnection>, kind: wit::TrackKind, codec: String) -> Result<u32, wit::MediaError> {
        let kind = match kind {
            wit::TrackKind::Audio => str0m::media::MediaKind::Audio,
            wit::TrackKind::Video => str0m::media::MediaKind::Video,
        };
        Ok(self.conn(&pc)?.add_track(kind, &codec)?)
    }

    fn write_media(&mut self, pc: Resource<PeerConnection>, track: u32, frame: Vec<u8>, timestamp_us: u64) -> Result<(), wit::MediaError> {
        Ok(self.conn(&pc)?.write_media(track, &frame, timestamp_us)?)
    }

    fn request_keyframe(&mut self, pc: Resource<PeerConnection>, track: u32) -> Result<(), wit::MediaError> {
        Ok(self.conn(&pc)?.request_keyframe(track, str0m::media::KeyframeRequestKind::Pli)?)
    }

    fn deliver_frames(&mut self, pc: Resource<PeerConnection>, track: u32, on: bool) -> Result<(), wit::MediaError> {
        Ok(self.conn(&pc)?.deliver_frames(track, on)?)
    }

    fn forward(&mut self, pc: Resource<PeerConnection>, track: u32, to: Resource<PeerConnection>, to_track: u32) -> Result<(), wit::MediaError> {
        let from = self.table.get(&pc).map(|p| p.conn.clone()).map_err(|e| MediaError::Closed(format!("no such peer connection: {e}")))?;
        let to = self.table.get(&to).map(|p| p.conn.clone()).map_err(|e| MediaError::Closed(format!("no such peer connection: {e}")))?;
        Ok(from.forward(track, &to, to_track)?)
    }

    fn close(&mut self, pc: Resource<PeerConnection>) {
        if let Ok(c) = self.conn(&pc) {
            c.close("closed by its hyperty");
        }
    }

    fn drop(&mut self, pc: Resource<PeerConnection>) -> wasmtime::Result<()> {
        // Dropping the host side closes the connection.
        self.table.delete(pc)?;
        Ok(())
    }
}

impl From<MediaError> for wit::MediaError {
    fn from(e: MediaError) -> wit::MediaError {
        match e {
            MediaError::MalformedSdp(s) => wit::MediaError::MalformedSdp(s),
            MediaError::NoSuchChannel(c) => wit::MediaError::NoSuchChannel(c),
            MediaError::NotGranted(s) => wit::MediaError::NotGranted(s),
            MediaError::LimitReached(s) => wit::MediaError::LimitReached(s),
            MediaError::Denied(s) => wit::MediaError::Denied(s),
            MediaError::Closed(s) => wit::MediaError::Closed(s),
            MediaError::Invalid(s) => wit::MediaError::Invalid(s),
        }
    }
}
