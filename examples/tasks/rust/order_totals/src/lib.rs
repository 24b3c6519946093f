//! The transform of the http-fetch example (examples/http-fetch): turns the fetched order
//! document into one row per order (id, customer, item count, total), largest total first.

use serde::{Deserialize, Serialize};
use sluice_guest::{Signal, export_task, info};

#[derive(Deserialize)]
struct Document {
    orders: Vec<Order>,
}

#[derive(Deserialize)]
struct Order {
    id: u64,
    customer: String,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    qty: u64,
    unit_cents: u64,
}

#[derive(Serialize)]
struct Row {
    id: u64,
    customer: String,
    items: u64,
    total: String,
}

fn run(doc: Document) -> Result<Vec<Row>, Signal> {
    let mut totals = Vec::with_capacity(doc.orders.len());
    for order in doc.orders {
        let mut cents: u64 = 0;
        let mut items: u64 = 0;
        for item in &order.items {
            cents = item
                .qty
                .checked_mul(item.unit_cents)
                .and_then(|c| cents.checked_add(c))
                .ok_or_else(|| Signal::Fail(format!("order {}: the total overflows", order.id)))?;
            items += item.qty;
        }
        totals.push((cents, order, items));
    }
    totals.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    info!("{} orders", totals.len());
    Ok(totals
        .into_iter()
        .map(|(cents, order, items)| Row {
            id: order.id,
            customer: order.customer,
            items,
            total: format!("{}.{:02}", cents / 100, cents % 100),
        })
        .collect())
}

export_task!(run);
