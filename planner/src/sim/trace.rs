//! Chrome trace-event JSON (opens in Perfetto and chrome://tracing): one process per rank and
//! one thread per stream, complete ("X") events in microseconds. The runtime writes the same
//! format from real runs, so simulated and measured steps can be laid side by side.

use serde::Serialize;

use super::engine::Stream;
use super::SimResult;

#[derive(Serialize)]
struct Event<'a> {
    name: &'a str,
    cat: &'a str,
    ph: &'a str,
    ts: f64,
    dur: f64,
    pid: u32,
    tid: u32,
}

#[derive(Serialize)]
struct Meta {
    name: &'static str,
    ph: &'static str,
    pid: u32,
    tid: u32,
    args: MetaArgs,
}

#[derive(Serialize)]
struct MetaArgs {
    name: String,
}

/// The trace of a simulated step as a JSON value `{"traceEvents": [...]}`.
pub fn chrome_trace(sim: &SimResult, label: &str) -> serde_json::Value {
    let Some(sched) = &sim.schedule else {
        return serde_json::json!({ "traceEvents": [] });
    };
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut lanes: Vec<u32> = Vec::new();
    for (i, op) in sim.engine_ops.iter().enumerate() {
        for &lane in &op.lanes {
            if !lanes.contains(&lane) {
                lanes.push(lane);
            }
            let e = Event {
                name: &op.name,
                cat: op.stream.name(),
                ph: "X",
                ts: sched.start[i] * 1e6,
                dur: (sched.end[i] - sched.start[i]) * 1e6,
                pid: lane,
                tid: op.stream as u32,
            };
            events.push(serde_json::to_value(e).expect("plain struct"));
        }
    }
    for &lane in &lanes {
        let pname = if sim.lanes == 1 {
            format!("rank 0 (represents every rank) {label}")
        } else {
            format!("rank {lane} {label}")
        };
        let m = Meta {
            name: "process_name",
            ph: "M",
            pid: lane,
            tid: 0,
            args: MetaArgs { name: pname },
        };
        events.push(serde_json::to_value(m).expect("plain struct"));
        for s in Stream::ALL {
            let m = Meta {
                name: "thread_name",
                ph: "M",
                pid: lane,
                tid: s as u32,
                args: MetaArgs {
                    name: s.name().to_string(),
                },
            };
            events.push(serde_json::to_value(m).expect("plain struct"));
        }
    }
    serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
}
