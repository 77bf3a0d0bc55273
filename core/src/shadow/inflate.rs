//! A bound on what automerge would inflate, measured before automerge sees the bytes.
//!
//! automerge (0.12) stores data DEFLATE-compressed in three places and inflates it in full while
//! parsing, before any size check of ours can run: a compressed change chunk (chunk type 2: the
//! whole body is raw DEFLATE), and the column data of document chunks (type 0) and bundle chunks
//! (type 3) whose column specification has the deflate bit (`0b1000`) set. Change chunks (type 1)
//! may not hold compressed columns; automerge refuses them. DEFLATE reaches ratios of about
//! 1000:1, so a 1.3 KB message could make automerge allocate megabytes, and a message at the frame
//! limit hundreds of megabytes. The format declares no uncompressed length to check, and
//! automerge's API has no hook to bound its inflater, so this module walks the chunk layout
//! itself (the layout as automerge 0.12's `storage::chunk`, `storage::document`,
//! `storage::bundle` and `RawColumns::parse` read it; also
//! <https://alexjg.github.io/automerge-storage-docs/>) and inflates every compressed region into
//! a fixed stack buffer, counting bytes and stopping one past the budget. Nothing is allocated
//! in proportion to what the data claims or inflates to.
//!
//! Where this walk cannot parse a chunk, automerge cannot either, and it fails that chunk before
//! inflating any of it (it takes the whole chunk, and for documents and bundles every column's
//! data, before it decompresses) and loads no chunk after it; so the walk stops there and leaves
//! the refusal to automerge. Where the walk parses more than automerge would (columns out of
//! order, a bad checksum, a missing suffix), it counts data automerge may never inflate: the
//! bound errs on the side of refusing.

use std::io::Read;

/// The four bytes every automerge chunk starts with.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// A change hash.
const HASH_LEN: usize = 32;
/// Chunk types (the byte after the checksum).
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
const CHUNK_BUNDLE: u8 = 3;
/// The deflate bit of a column specification.
const COLUMN_DEFLATE: u32 = 0b1000;
/// Inflated bytes are counted through this buffer, never kept.
const SCRATCH_LEN: usize = 4096;

/// The compressed parts would inflate past the budget.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct OverBudget;

/// Subtracts from `budget` what the compressed parts of the concatenated chunks in `bytes` inflate
/// to; fails as soon as they would inflate past it. Costs at most `budget` plus one buffer of
/// inflated bytes of work, a 4 KiB buffer and the inflater's state, however large the claim.
pub(super) fn charge(bytes: &[u8], budget: &mut usize) -> Result<(), OverBudget> {
    let mut input = Input(bytes);
    while !input.0.is_empty() {
        let Some((chunk_type, body)) = input.chunk() else {
            return Ok(());
        };
        let walk = match chunk_type {
            CHUNK_COMPRESSED_CHANGE => {
                inflate(body, budget)?;
                Walk::Done
            }
            CHUNK_DOCUMENT => document_columns(body, budget)?,
            CHUNK_BUNDLE => bundle_columns(body, budget)?,
            // Change chunks hold no compressed data. automerge stops at an unknown type; the walk
            // goes on, which can only count more.
            _ => Walk::Done,
        };
        if walk == Walk::Stopped {
            return Ok(());
        }
    }
    Ok(())
}

/// Whether a chunk's layout could be walked to its end.
#[derive(Debug, PartialEq, Eq)]
enum Walk {
    Done,
    Stopped,
}

/// A document body: actors, heads, change column metadata, op column metadata, change data, op
/// data (then head indices, which hold nothing compressed).
fn document_columns(body: &[u8], budget: &mut usize) -> Result<Walk, OverBudget> {
    let mut input = Input(body);
    let Some((change_columns, op_columns)) = (|| {
        input.actors()?;
        input.hashes()?;
        let change_columns = input.columns()?;
        let op_columns = input.columns()?;
        Some((change_columns, op_columns))
    })() else {
        return Ok(Walk::Stopped);
    };
    for columns in [change_columns, op_columns] {
        if inflate_columns(&mut input, &columns, budget)? == Walk::Stopped {
            return Ok(Walk::Stopped);
        }
    }
    Ok(Walk::Done)
}

/// A bundle body: dependencies, actors, change column metadata and data, op column metadata and
/// data.
fn bundle_columns(body: &[u8], budget: &mut usize) -> Result<Walk, OverBudget> {
    let mut input = Input(body);
    if input.hashes().and_then(|()| input.actors()).is_none() {
        return Ok(Walk::Stopped);
    }
    for _ in 0..2 {
        let Some(columns) = input.columns() else {
            return Ok(Walk::Stopped);
        };
        if inflate_columns(&mut input, &columns, budget)? == Walk::Stopped {
            return Ok(Walk::Stopped);
        }
    }
    Ok(Walk::Done)
}

/// Takes the data of `columns` (laid out one after the other) from `input` and inflates the
/// compressed ones.
fn inflate_columns(input: &mut Input<'_>, columns: &[(u32, usize)], budget: &mut usize) -> Result<Walk, OverBudget> {
    let Some(total) = columns.iter().try_fold(0usize, |total, (_, len)| total.checked_add(*len)) else {
        return Ok(Walk::Stopped);
    };
    let Some(mut data) = input.take(total) else {
        return Ok(Walk::Stopped);
    };
    for &(spec, len) in columns {
        let (column, rest) = data.split_at(len);
        if spec & COLUMN_DEFLATE != 0 {
            inflate(column, budget)?;
        }
        data = rest;
    }
    Ok(Walk::Done)
}

/// Inflates raw DEFLATE `data` as automerge does (flate2, same backend), counting the output
/// against `budget`. A stream that turns out corrupt is charged for what it inflated before the
/// error, which automerge also allocates before it gives up.
fn inflate(data: &[u8], budget: &mut usize) -> Result<(), OverBudget> {
    let mut inflater = flate2::bufread::DeflateDecoder::new(data);
    let mut scratch = [0u8; SCRATCH_LEN];
    loop {
        match inflater.read(&mut scratch) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => *budget = budget.checked_sub(n).ok_or(OverBudget)?,
        }
    }
}

/// Bytes not yet read.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(taken)
    }

    /// An unsigned LEB128 number, with automerge's checks (at most ten bytes, no overflow).
    fn uleb(&mut self) -> Option<u64> {
        let mut value = 0u64;
        let mut shift = 0u32;
        loop {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            shift += 7;
            if byte & 0x80 == 0 {
                return (shift <= 64 || byte <= 1).then_some(value);
            }
            if shift > 64 {
                return None;
            }
        }
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.uleb()?).ok()
    }

    /// A chunk header and its body: magic, checksum, type, LEB128 length.
    fn chunk(&mut self) -> Option<(u8, &'a [u8])> {
        if self.take(MAGIC.len())? != MAGIC {
            return None;
        }
        self.take(4)?;
        let (&chunk_type, rest) = self.0.split_first()?;
        self.0 = rest;
        let len = self.len()?;
        Some((chunk_type, self.take(len)?))
    }

    /// A counted list of length-prefixed actor ids.
    fn actors(&mut self) -> Option<()> {
        for _ in 0..self.uleb()? {
            let len = self.len()?;
            self.take(len)?;
        }
        Some(())
    }

    /// A counted list of change hashes.
    fn hashes(&mut self) -> Option<()> {
        for _ in 0..self.uleb()? {
            self.take(HASH_LEN)?;
        }
        Some(())
    }

    /// Column metadata: a count, then (specification, data length) pairs. The list grows by one
    /// entry per two bytes read at least, so it is bounded by the input.
    fn columns(&mut self) -> Option<Vec<(u32, usize)>> {
        let count = self.uleb()?;
        let mut columns = Vec::new();
        for _ in 0..count {
            let spec = u32::try_from(self.uleb()?).ok()?;
            let len = self.len()?;
            columns.push((spec, len));
        }
        Some(columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn uleb(mut value: u64, out: &mut Vec<u8>) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn chunk(chunk_type: u8, body: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend([0, 0, 0, 0, chunk_type]);
        uleb(body.len() as u64, &mut out);
        out.extend(body);
        out
    }

    /// A document body with one plain and one deflated change column and one deflated op column.
    fn document(change_plain: &[u8], change_deflated: &[u8], ops_deflated: &[u8]) -> Vec<u8> {
        let mut body = vec![1, 2, 0xaa, 0xbb, 0]; // one actor of two bytes, no heads
        body.push(2);
        uleb(0x11, &mut body);
        uleb(change_plain.len() as u64, &mut body);
        uleb(0x20 | u64::from(COLUMN_DEFLATE), &mut body);
        uleb(change_deflated.len() as u64, &mut body);
        body.push(1);
        uleb(0x30 | u64::from(COLUMN_DEFLATE), &mut body);
        uleb(ops_deflated.len() as u64, &mut body);
        body.extend(change_plain);
        body.extend(change_deflated);
        body.extend(ops_deflated);
        chunk(CHUNK_DOCUMENT, &body)
    }

    fn charged(bytes: &[u8], budget: usize) -> Result<usize, OverBudget> {
        let mut left = budget;
        charge(bytes, &mut left)?;
        Ok(budget - left)
    }

    #[test]
    fn a_compressed_change_is_charged_what_it_inflates_to() {
        let bytes = chunk(CHUNK_COMPRESSED_CHANGE, &deflate(&[7; 10_000]));
        assert_eq!(charged(&bytes, 10_000), Ok(10_000));
        assert_eq!(charged(&bytes, 9_999), Err(OverBudget));
    }

    #[test]
    fn only_deflated_columns_of_a_document_are_charged() {
        let bytes = document(&[1; 300], &deflate(&[2; 5_000]), &deflate(&[3; 6_000]));
        assert_eq!(charged(&bytes, 1 << 20), Ok(11_000));
        assert_eq!(charged(&bytes, 10_999), Err(OverBudget));
    }

    #[test]
    fn chunks_share_one_budget_and_bundles_count() {
        let mut body = vec![0, 0]; // no deps, no actors
        for (spec, data) in [(0x18u64, deflate(&[4; 3_000])), (0x28, deflate(&[5; 4_000]))] {
            body.push(1);
            uleb(spec, &mut body);
            uleb(data.len() as u64, &mut body);
            body.extend(data);
        }
        let mut bytes = chunk(CHUNK_BUNDLE, &body);
        bytes.extend(chunk(CHUNK_COMPRESSED_CHANGE, &deflate(&[6; 2_000])));
        bytes.extend(chunk(1, &[0; 40]));
        assert_eq!(charged(&bytes, 1 << 20), Ok(9_000));
    }

    #[test]
    fn a_walk_stops_where_automerge_would() {
        // A truncated document: its column data is missing, so automerge inflates nothing of it
        // and loads nothing after it.
        let mut bytes = document(&[1; 10], &deflate(&[2; 5_000]), &deflate(&[3; 6_000]));
        let cut = bytes.len() - 3;
        bytes.truncate(cut);
        assert_eq!(charged(&bytes, 1 << 20), Ok(0));
        // Garbage, an unknown chunk type, a length past the end.
        assert_eq!(charged(b"not automerge at all", 0), Ok(0));
        assert_eq!(charged(&chunk(9, &deflate(&[0; 4_000])), 0), Ok(0));
        let mut short = chunk(CHUNK_COMPRESSED_CHANGE, &deflate(&[0; 4_000]));
        short.pop();
        assert_eq!(charged(&short, 0), Ok(0));
    }

    #[test]
    fn a_corrupt_stream_is_charged_what_it_inflated_before_the_error() {
        let mut stream = deflate(&[9; 50_000]);
        let len = stream.len();
        stream[len / 2..].fill(0xff);
        let inflated = charged(&chunk(CHUNK_COMPRESSED_CHANGE, &stream), 1 << 20).unwrap();
        assert!(inflated < 50_000, "{inflated}");
    }

    #[test]
    fn lebs_read_as_automerge_reads_them() {
        assert_eq!(Input(&[0x7f]).uleb(), Some(127));
        assert_eq!(Input(&[0x80, 0x01]).uleb(), Some(128));
        assert_eq!(Input(&[0xff; 9].iter().copied().chain([0x01]).collect::<Vec<_>>()).uleb(), Some(u64::MAX));
        assert_eq!(Input(&[0xff; 9].iter().copied().chain([0x02]).collect::<Vec<_>>()).uleb(), None);
        assert_eq!(Input(&[0x80; 11]).uleb(), None);
        assert_eq!(Input(&[0x80]).uleb(), None);
    }
}
