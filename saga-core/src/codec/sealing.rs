//! Where the payloads are in the engine's records: each event, timer, command and outcome
//! carries at most one, sealed and opened in place.

use serde_json::Value;

use super::{CodecError, Payloads};
use crate::decide::Timer;
use crate::event::Event;
use crate::message::{Command, Outcome};

/// A record that carries at most one payload.
pub(crate) trait Carries {
    /// The payload, if this record has one.
    fn payload_mut(&mut self) -> Option<&mut Value>;

    /// Drops what the record says about its payload in the clear (sealing it hides it).
    fn hide_metadata(&mut self) {}
}

impl Carries for Event {
    fn payload_mut(&mut self) -> Option<&mut Value> {
        match self {
            Event::Started { input, .. } => Some(input),
            Event::Dispatched { payload, .. } | Event::SignalReceived { payload, .. } => {
                Some(payload)
            }
            Event::Succeeded { output, .. } => Some(output),
            _ => None,
        }
    }
}

impl Carries for Timer {
    fn payload_mut(&mut self) -> Option<&mut Value> {
        match self {
            Timer::Signal { payload, .. } => Some(payload),
            _ => None,
        }
    }
}

impl Carries for Command {
    fn payload_mut(&mut self) -> Option<&mut Value> {
        Some(&mut self.payload)
    }

    /// The input's type name would travel beside the sealed input.
    fn hide_metadata(&mut self) {
        self.input_type = None;
    }
}

impl Carries for Outcome {
    fn payload_mut(&mut self) -> Option<&mut Value> {
        match self {
            Outcome::Success { output } => Some(output),
            _ => None,
        }
    }
}

impl Payloads {
    /// Seals the payload `record` carries.
    pub(crate) fn seal_in(&self, record: &mut impl Carries) -> Result<(), CodecError> {
        if !self.is_encoding() {
            return Ok(());
        }
        record.hide_metadata();
        if let Some(slot) = record.payload_mut() {
            *slot = self.seal(std::mem::take(slot))?;
        }
        Ok(())
    }

    /// Seals the payload `record` carries, unless it is sealed already.
    pub(crate) fn seal_in_once(&self, record: &mut impl Carries) -> Result<(), CodecError> {
        if !self.is_encoding() {
            return Ok(());
        }
        record.hide_metadata();
        if let Some(slot) = record.payload_mut() {
            *slot = self.seal_once(std::mem::take(slot))?;
        }
        Ok(())
    }

    /// Opens the payload `record` carries, if it is sealed.
    pub(crate) fn open_in(&self, record: &mut impl Carries) -> Result<(), CodecError> {
        if let Some(slot) = record.payload_mut()
            && Self::sealed_key(slot).is_some()
        {
            *slot = self.open(std::mem::take(slot))?;
        }
        Ok(())
    }

    /// Opens the payload `record` carries if this process holds its key; else leaves it sealed.
    pub(crate) fn open_in_if_possible(&self, record: &mut impl Carries) {
        if let Some(slot) = record.payload_mut()
            && Self::sealed_key(slot).is_some()
        {
            *slot = self.open_if_possible(std::mem::take(slot));
        }
    }
}
