//! The last step of the polyglot flow (examples/polyglot): recomputes the C task's checksum over
//! the JavaScript task's records (FAIL if they differ, so a hand-off that changed the data is
//! caught) and summarises the orders.

use serde::{Deserialize, Serialize};
use sluice_guest::{Signal, export_task, info};

#[derive(Deserialize)]
struct Order {
    id: i64,
    customer: String,
    cents: i64,
}

#[derive(Deserialize)]
struct Checksum {
    count: usize,
    fnv1a64: String,
}

#[derive(Deserialize)]
struct Input {
    records: Vec<Order>,
    checksum: Checksum,
}

#[derive(Serialize)]
struct Summary {
    orders: usize,
    total_cents: i64,
    total: String,
    largest: String,
    checksum: String,
}

/// FNV-1a (64-bit) over each record as `<id>|<customer>|<cents>\n`, as the C task computes it.
fn fnv1a64(records: &[Order]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in records {
        for b in format!("{}|{}|{}\n", r.id, r.customer, r.cents).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

fn run(input: Input) -> Result<Summary, Signal> {
    let expected = format!("{:016x}", fnv1a64(&input.records));
    if input.checksum.count != input.records.len() || input.checksum.fnv1a64 != expected {
        return Err(Signal::fail(format!(
            "checksum mismatch: got {} over {} records, computed {expected} over {}",
            input.checksum.fnv1a64,
            input.checksum.count,
            input.records.len()
        )));
    }
    let total_cents = input
        .records
        .iter()
        .try_fold(0i64, |acc, r| acc.checked_add(r.cents))
        .ok_or_else(|| Signal::fail("the total overflows a 64-bit integer"))?;
    let largest = input
        .records
        .iter()
        .max_by_key(|r| (r.cents, -r.id))
        .map(|r| r.customer.clone())
        .unwrap_or_default();
    info!("{} orders verified ({expected})", input.records.len());
    Ok(Summary {
        orders: input.records.len(),
        total_cents,
        total: format!("{}.{:02}", total_cents / 100, total_cents % 100),
        largest,
        checksum: expected,
    })
}

export_task!(run);
