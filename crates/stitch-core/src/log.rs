//! `LogLine`: one frame of a build's log, byte-compatible with Tangled's
//! spindle `/logs` frames (see `research/tangled_tack.md` §2.4).
//!
//! Field order and omission rules follow the Go struct exactly:
//! `kind, content, time, step_id, stream?, step_status?, step_kind?, step_command?`
//! where `?` marks Go `omitempty` (empty string / zero int are left out).

use std::fmt;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Whether a line carries output (`data`) or opens/closes a step (`control`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// A line of output from a step.
    Data,
    /// A step boundary (start or end).
    Control,
}

/// Which output stream a data line came from.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for OutputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a control line opens or closes a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// The step begins.
    Start,
    /// The step is over.
    End,
}

/// The kind of a step, an integer on the wire: `0` system (rendered
/// collapsed by the Tangled appview, and omitted from frames because Go's
/// `omitempty` drops a zero int), `1` user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// Set-up work the user did not write (checkout, clean-up). Wire `0`.
    #[default]
    System,
    /// A step the user asked for. Wire `1`.
    User,
}

impl StepKind {
    /// The wire integer.
    pub fn as_int(self) -> u8 {
        match self {
            StepKind::System => 0,
            StepKind::User => 1,
        }
    }

    /// Whether this is the zero value that serialization omits.
    pub fn is_system(&self) -> bool {
        *self == StepKind::System
    }
}

impl Serialize for StepKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.as_int())
    }
}

impl<'de> Deserialize<'de> for StepKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match i64::deserialize(d)? {
            0 => Ok(StepKind::System),
            1 => Ok(StepKind::User),
            other => Err(serde::de::Error::custom(format!(
                "invalid step_kind {other}: expected 0 (system) or 1 (user)"
            ))),
        }
    }
}

/// One log frame. Times are kept at millisecond precision so a line survives
/// a serialize/deserialize round trip unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogLine {
    /// `data` or `control`.
    pub kind: LogKind,
    /// The output line (data) or the step name (control).
    pub content: String,
    /// When the line was produced; RFC 3339 UTC with milliseconds on the wire.
    #[serde(with = "wire_time")]
    pub time: DateTime<Utc>,
    /// The step this line belongs to.
    pub step_id: i64,
    /// Output stream of a data line.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "empty_str_as_none"
    )]
    pub stream: Option<OutputStream>,
    /// Start/end marker of a control line.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "empty_str_as_none"
    )]
    pub step_status: Option<StepStatus>,
    /// System or user step (control lines): `1` = user; omitted for `0` = system.
    #[serde(default, skip_serializing_if = "StepKind::is_system")]
    #[schema(value_type = u8, minimum = 0, maximum = 1)]
    pub step_kind: StepKind,
    /// The command a step runs (start control lines).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "empty_string_as_none"
    )]
    pub step_command: Option<String>,
}

impl LogLine {
    /// A line of output. A trailing `\n` / `\r\n` is trimmed, as the stock
    /// spindle does for each write.
    pub fn data(
        step_id: i64,
        stream: OutputStream,
        content: impl Into<String>,
        time: DateTime<Utc>,
    ) -> Self {
        let mut content = content.into();
        let trimmed = content.trim_end_matches(['\n', '\r']).len();
        content.truncate(trimmed);
        Self {
            kind: LogKind::Data,
            content,
            time: time.trunc_subsecs(3),
            step_id,
            stream: Some(stream),
            step_status: None,
            step_kind: StepKind::System,
            step_command: None,
        }
    }

    /// The control line that opens step `step_id` named `name`.
    pub fn step_start(
        step_id: i64,
        name: impl Into<String>,
        kind: StepKind,
        command: Option<String>,
        time: DateTime<Utc>,
    ) -> Self {
        Self {
            kind: LogKind::Control,
            content: name.into(),
            time: time.trunc_subsecs(3),
            step_id,
            stream: None,
            step_status: Some(StepStatus::Start),
            step_kind: kind,
            step_command: command.filter(|c| !c.is_empty()),
        }
    }

    /// The control line that closes step `step_id` (the appview computes the
    /// step's duration from the start and end times).
    pub fn step_end(
        step_id: i64,
        name: impl Into<String>,
        kind: StepKind,
        time: DateTime<Utc>,
    ) -> Self {
        Self {
            kind: LogKind::Control,
            content: name.into(),
            time: time.trunc_subsecs(3),
            step_id,
            stream: None,
            step_status: Some(StepStatus::End),
            step_kind: kind,
            step_command: None,
        }
    }
}

/// Go's `omitempty` writers never send `""`, but a frame that carries one
/// means "absent", so accept it as `None`.
fn empty_str_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let raw: Option<String> = Option::deserialize(d)?;
    match raw.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => T::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(s)).map(Some),
    }
}

fn empty_string_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    Ok(raw.filter(|s| !s.is_empty()))
}

/// RFC 3339 with exactly three fractional digits and a `Z`
/// (`2026-01-02T03:04:05.123Z`). Any RFC 3339 time is accepted on input
/// (Go writes up to nanoseconds) and truncated to milliseconds.
mod wire_time {
    use chrono::{DateTime, SubsecRound, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&t.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc).trunc_subsecs(3))
            .map_err(|e| serde::de::Error::custom(format!("invalid RFC 3339 time {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap() + chrono::Duration::microseconds(123_456)
    }

    // The three frames of research/tangled_tack.md §2.4, byte for byte.
    const START: &str = r#"{"kind":"control","content":"step name","time":"2026-01-02T03:04:05.123Z","step_id":1,"step_status":"start","step_kind":1,"step_command":"make test"}"#;
    const DATA: &str = r#"{"kind":"data","content":"one line, no trailing newline","time":"2026-01-02T03:04:05.123Z","step_id":1,"stream":"stdout"}"#;
    const END: &str = r#"{"kind":"control","content":"step name","time":"2026-01-02T03:04:05.123Z","step_id":1,"step_status":"end","step_kind":1}"#;

    #[test]
    fn step_start_frame_matches_tangled() {
        let line = LogLine::step_start(
            1,
            "step name",
            StepKind::User,
            Some("make test".into()),
            t(),
        );
        assert_eq!(serde_json::to_string(&line).unwrap(), START);
        assert_eq!(serde_json::from_str::<LogLine>(START).unwrap(), line);
    }

    #[test]
    fn data_frame_matches_tangled() {
        let line = LogLine::data(
            1,
            OutputStream::Stdout,
            "one line, no trailing newline\r\n",
            t(),
        );
        assert_eq!(serde_json::to_string(&line).unwrap(), DATA);
        assert_eq!(serde_json::from_str::<LogLine>(DATA).unwrap(), line);
    }

    #[test]
    fn step_end_frame_matches_tangled() {
        let line = LogLine::step_end(1, "step name", StepKind::User, t());
        assert_eq!(serde_json::to_string(&line).unwrap(), END);
        assert_eq!(serde_json::from_str::<LogLine>(END).unwrap(), line);
    }

    #[test]
    fn system_steps_omit_step_kind_and_stderr_is_tagged() {
        let start = LogLine::step_start(0, "checkout", StepKind::System, None, t());
        assert_eq!(
            serde_json::to_string(&start).unwrap(),
            r#"{"kind":"control","content":"checkout","time":"2026-01-02T03:04:05.123Z","step_id":0,"step_status":"start"}"#
        );
        let err = LogLine::data(2, OutputStream::Stderr, "boom", t());
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"kind":"data","content":"boom","time":"2026-01-02T03:04:05.123Z","step_id":2,"stream":"stderr"}"#
        );
    }

    #[test]
    fn whole_seconds_still_carry_millis() {
        let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let line = LogLine::data(1, OutputStream::Stdout, "x", at);
        assert!(serde_json::to_string(&line)
            .unwrap()
            .contains(r#""time":"2026-01-02T03:04:05.000Z""#));
    }

    #[test]
    fn go_frames_with_nanos_offsets_and_empty_strings_are_accepted() {
        let go = r#"{"kind":"data","content":"x","time":"2026-01-02T04:04:05.123456789+01:00","step_id":3,"stream":"","step_status":"","step_command":""}"#;
        let line: LogLine = serde_json::from_str(go).unwrap();
        assert_eq!(line.time, t().trunc_subsecs(3));
        assert_eq!(line.stream, None);
        assert_eq!(line.step_status, None);
        assert_eq!(line.step_command, None);
        assert_eq!(line.step_kind, StepKind::System);
    }

    #[test]
    fn bad_frames_are_refused() {
        let bad_kind = r#"{"kind":"data","content":"x","time":"2026-01-02T03:04:05Z","step_id":1,"step_kind":7}"#;
        assert!(serde_json::from_str::<LogLine>(bad_kind)
            .unwrap_err()
            .to_string()
            .contains("step_kind"));
        let bad_time = r#"{"kind":"data","content":"x","time":"yesterday","step_id":1}"#;
        assert!(serde_json::from_str::<LogLine>(bad_time)
            .unwrap_err()
            .to_string()
            .contains("RFC 3339"));
    }
}
