//! The audit trail: an append-only, hash-chained table in the outbox's SQLite file. Each
//! entry holds the hash of the one before it, so an edited, deleted or inserted row breaks the
//! chain at that row, and `shuyuan audit verify` names it. Entries are written in the same
//! transaction as what they record (a batch sealed, evicted, acknowledged, quarantined,
//! dropped), so the trail and the queue never disagree. Details hold counts, sequence numbers
//! and error kinds, never a field value.
//!
//! Entry hash: SHA-256 of `"shuyuan-audit-v1"`, id (u64 BE), ts_ms (i64 BE), the kind and the
//! detail (each as u32 BE length + UTF-8), and the previous entry's hash (32 zero bytes for
//! the first entry).

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit (
    id     INTEGER PRIMARY KEY,
    ts_ms  INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    detail TEXT    NOT NULL,
    prev   BLOB    NOT NULL,
    hash   BLOB    NOT NULL
);";

fn entry_hash(id: i64, ts_ms: i64, kind: &str, detail: &str, prev: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"shuyuan-audit-v1");
    h.update(id.to_be_bytes());
    h.update(ts_ms.to_be_bytes());
    for part in [kind.as_bytes(), detail.as_bytes()] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.update(prev);
    h.finalize().to_vec()
}

/// Appends one entry (inside the caller's transaction, when there is one).
pub fn append(c: &Connection, kind: &str, detail: &serde_json::Value) -> rusqlite::Result<()> {
    append_at(c, crate::timefmt::now_ms(), kind, detail)
}

pub(crate) fn append_at(
    c: &Connection,
    ts: i64,
    kind: &str,
    detail: &serde_json::Value,
) -> rusqlite::Result<()> {
    let last: Option<(i64, Vec<u8>)> = c
        .query_row(
            "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        None => (1, vec![0u8; 32]),
    };
    let detail = detail.to_string();
    let hash = entry_hash(id, ts, kind, &detail, &prev);
    c.execute(
        "INSERT INTO audit(id, ts_ms, kind, detail, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id, ts, kind, detail, prev, hash],
    )?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: i64,
    pub ts_ms: i64,
    pub kind: String,
    pub detail: serde_json::Value,
    pub hash: String,
}

/// Entries with an id above `after`, oldest first, at most `limit`.
pub fn list(c: &Connection, after: i64, limit: usize) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = c.prepare(
        "SELECT id, ts_ms, kind, detail, hash FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        let detail: String = r.get(3)?;
        let hash: Vec<u8> = r.get(4)?;
        Ok(Entry {
            id: r.get(0)?,
            ts_ms: r.get(1)?,
            kind: r.get(2)?,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
        })
    })?;
    rows.collect()
}

/// The detail of the newest entry of `kind`, if any.
pub fn last_of(c: &Connection, kind: &str) -> rusqlite::Result<Option<serde_json::Value>> {
    use rusqlite::OptionalExtension;
    let detail: Option<String> = c
        .query_row(
            "SELECT detail FROM audit WHERE kind = ?1 ORDER BY id DESC LIMIT 1",
            [kind],
            |r| r.get(0),
        )
        .optional()?;
    Ok(detail.and_then(|d| serde_json::from_str(&d).ok()))
}

/// Retention: removes the oldest entries, those before `cutoff_ms`, as a prefix of the chain
/// (so what remains still verifies from its first entry), and records the pruning. Returns
/// how many were removed.
pub fn prune(c: &mut Connection, cutoff_ms: i64) -> rusqlite::Result<u64> {
    let tx = c.transaction()?;
    let last: Option<i64> = tx.query_row(
        "SELECT MAX(id) FROM audit WHERE ts_ms < ?1",
        [cutoff_ms],
        |r| r.get(0),
    )?;
    let Some(last) = last else { return Ok(0) };
    // Never remove the newest entry: the chain continues from it.
    let newest: i64 = tx.query_row("SELECT MAX(id) FROM audit", [], |r| r.get(0))?;
    let upto = last.min(newest - 1);
    let n = tx.execute("DELETE FROM audit WHERE id <= ?1", [upto])?;
    if n > 0 {
        append(
            &tx,
            "audit_pruned",
            &serde_json::json!({ "removed_through_id": upto, "entries": n, "older_than_ms": cutoff_ms }),
        )?;
    }
    tx.commit()?;
    Ok(n as u64)
}

/// Checks the whole chain. `Ok(n)`: n entries, all linked. `Err((id, why))`: the first entry
/// that does not fit.
pub fn verify(c: &Connection) -> rusqlite::Result<Result<u64, (i64, String)>> {
    let mut stmt =
        c.prepare("SELECT id, ts_ms, kind, detail, prev, hash FROM audit ORDER BY id")?;
    let mut rows = stmt.query([])?;
    // After retention the first remaining entry anchors the chain.
    let mut expect_prev: Option<Vec<u8>> = None;
    let mut expect_id: Option<i64> = None;
    let mut n = 0u64;
    while let Some(r) = rows.next()? {
        let (id, ts, kind, detail): (i64, i64, String, String) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        let (prev, hash): (Vec<u8>, Vec<u8>) = (r.get(4)?, r.get(5)?);
        if let Some(want) = expect_id {
            if id != want {
                return Ok(Err((
                    want,
                    format!("entry {want} is missing (the next one is {id})"),
                )));
            }
        }
        if expect_prev.as_ref().is_some_and(|p| *p != prev) {
            return Ok(Err((id, "it does not link to the entry before it".into())));
        }
        if entry_hash(id, ts, &kind, &detail, &prev) != hash {
            return Ok(Err((
                id,
                "its content does not match its hash (it was altered)".into(),
            )));
        }
        expect_prev = Some(hash);
        expect_id = Some(id + 1);
        n += 1;
    }
    Ok(Ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editing_deleting_or_reordering_an_entry_is_found_at_that_entry() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        for i in 0..10 {
            append(
                &c,
                "batch_sealed",
                &serde_json::json!({ "seq": i, "records": 5 }),
            )
            .unwrap();
        }
        assert_eq!(verify(&c).unwrap(), Ok(10));
        c.execute(
            "UPDATE audit SET detail = '{\"seq\":4,\"records\":500}' WHERE id = 5",
            [],
        )
        .unwrap();
        assert_eq!(verify(&c).unwrap().unwrap_err().0, 5);

        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        for i in 0..10 {
            append(&c, "k", &serde_json::json!(i)).unwrap();
        }
        c.execute("DELETE FROM audit WHERE id = 7", []).unwrap();
        assert_eq!(verify(&c).unwrap().unwrap_err().0, 7);
    }

    #[test]
    fn retention_removes_a_prefix_and_the_rest_still_verifies() {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        let day = 86_400_000i64;
        for i in 0..10 {
            append_at(
                &c,
                i * day,
                "batch_sealed",
                &serde_json::json!({ "seq": i }),
            )
            .unwrap();
        }
        assert_eq!(prune(&mut c, 4 * day).unwrap(), 4);
        assert_eq!(verify(&c).unwrap(), Ok(7), "6 kept + the pruning record");
        let first: i64 = c
            .query_row("SELECT MIN(id) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(first, 5);
        // Editing the new first entry is still caught.
        c.execute("UPDATE audit SET detail = '{}' WHERE id = 5", [])
            .unwrap();
        assert_eq!(verify(&c).unwrap().unwrap_err().0, 5);
    }
}
