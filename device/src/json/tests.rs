//! Tests of the JSON line formats.

use super::*;
use tidesync_core::event::{DeviceId, EventId, Hlc, Seq};

#[test]
fn a_reading_line_needs_no_kind() {
    let parsed = parse_line(r#"{"sensor":"temp","value":21.5,"unit":"Cel"}"#, Millis(7)).unwrap();
    let expected = NewEvent::new(
        Millis(7),
        &Payload::Reading(SensorReading { sensor: "temp".into(), value: 21.5, unit: "Cel".into() }),
    )
    .unwrap();
    assert_eq!(parsed, expected);
}

#[test]
fn event_time_kind_log_and_app_lines_parse() {
    let log = parse_line(r#"{"kind":"log","level":"warn","message":"fan slow","event_time_ms":5}"#, Millis(7)).unwrap();
    let expected =
        NewEvent::new(Millis(5), &Payload::Log(LogLine { level: LogLevel::Warn, message: "fan slow".into() })).unwrap();
    assert_eq!(log, expected);
    let app = parse_line(r#"{"kind":"app","content_type":"text/plain","data":"hi"}"#, Millis(7)).unwrap();
    let expected =
        NewEvent::new(Millis(7), &Payload::App(AppPayload { content_type: "text/plain".into(), data: b"hi".to_vec() }))
            .unwrap();
    assert_eq!(app, expected);
}

#[test]
fn bad_lines_say_what_is_wrong() {
    let cases = [
        ("not json", "expected"),
        ("[1,2]", "expected a JSON object"),
        (r#"{"sensor":"temp"}"#, "missing field `value`"),
        (r#"{"sensor":"temp","value":1,"colour":"red"}"#, "unknown field `colour`"),
        (r#"{"kind":"gap","first":1,"last":2}"#, "unknown variant `gap`"),
        (r#"{"sensor":"","value":1}"#, "sensor is 0 bytes"),
        (r#"{"sensor":"temp","value":"warm"}"#, "invalid type"),
    ];
    for (line, expected) in cases {
        let message = parse_line(line, Millis(0)).unwrap_err().to_string();
        assert!(message.contains(expected), "{line}: {message}");
    }
}

#[test]
fn exported_events_name_their_kind_and_fields() {
    let event = Event {
        id: EventId { device: DeviceId::new("pump-7").unwrap(), seq: Seq(3) },
        hlc: Hlc { wall_ms: 10, logical: 2 },
        event_time: Millis(9),
        payload: Payload::Reading(SensorReading { sensor: "temp".into(), value: 21.5, unit: "Cel".into() }),
    };
    let json = event_to_json(&event);
    assert_eq!(json["seq"], 3);
    assert_eq!(json["kind"], "reading");
    assert_eq!(json["hlc"]["logical"], 2);
    assert_eq!(json["payload"]["value"], 21.5);
}
