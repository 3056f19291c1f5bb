//! The block exchange wire format, `/codex/blockexc/1.0.0`: the messages, their protobuf
//! codec and the length-prefixed framing.
//!
//! ```text
//! Message       { 1: WantList (always present)  3: BlockDelivery*  4: BlockPresence*
//!                 5: pendingBytes = 0  6: {1: ""}  7: {1: ""} }
//! WantList      { 1: Entry*  2: full (bool) }
//! Entry         { 1: BlockAddress  2: priority  3: cancel  4: wantType  5: sendDontHave }
//! BlockAddress  { 1: leaf (bool); if leaf: 2: treeCid, 3: index; else: 4: cid }
//! BlockDelivery { 1: cid  2: data  3: BlockAddress  4: proof (leaf only) }
//! BlockPresence { 1: BlockAddress  2: type (0 Have, 1 DontHave)  3: price (32 zero bytes) }
//! ```
//!
//! The encoder writes every field the reference writes, zero values included, so an empty
//! message is `0a021000280032020a003a020a00`. The decoder skips unknown fields and rejects
//! malformed varints, truncated fields, wrong wire types on known fields, invalid CIDs,
//! addresses and entries missing their required parts, and messages over [`MAX_MESSAGE`].
//! It checks the shape only: whether a delivered block matches its CID, was asked for, and
//! carries a proof leading to its tree root is for the caller to verify.
//!
//! On the wire each message is an unsigned varint length followed by the message
//! ([`frame`], [`read_message`], [`write_message`]).

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frames::{FramePool, FRAME_BUF};
use crate::cid::Cid;
use crate::merkle::{Proof, TreeError};
use crate::pb::{self, Fields, LEN, VARINT};

pub use crate::pb::DecodeError;

/// The libp2p protocol name of the block exchange.
pub const PROTOCOL: &str = "/codex/blockexc/1.0.0";

/// Largest message accepted or produced: 100 MiB, the reference's `MaxMessageSize`.
pub const MAX_MESSAGE: usize = 100 << 20;

/// Where a block lives: its own CID, or a leaf of a dataset's CodexTree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockAddress {
    /// A block addressed by its CID (`leaf = false`, field 4).
    Cid(Cid),
    /// Leaf `index` of the tree whose root CID is `tree` (`leaf = true`, fields 2 and 3).
    Leaf {
        /// The CodexTree root CID of the dataset.
        tree: Cid,
        /// The block's index in the dataset.
        index: u64,
    },
}

impl From<Cid> for BlockAddress {
    fn from(cid: Cid) -> Self {
        Self::Cid(cid)
    }
}

/// What a want-list entry asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WantType {
    /// Send the block itself (`0`, the protobuf default).
    #[default]
    Block,
    /// Say whether you have the block (`1`).
    Have,
}

/// One entry of a want list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The block wanted.
    pub address: BlockAddress,
    /// Priority; the reference always sends 0.
    pub priority: i32,
    /// Whether this entry withdraws an earlier want.
    pub cancel: bool,
    /// Whether the block or only its presence is wanted.
    pub want_type: WantType,
    /// Whether the peer should answer `DontHave` when it lacks the block.
    pub send_dont_have: bool,
}

/// The want list of a message; every message carries one, often empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WantList {
    /// The entries, in the order the sender wants them served.
    pub entries: Vec<Entry>,
    /// Whether this replaces the sender's whole want list.
    pub full: bool,
}

/// A delivered block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The block's own CID.
    pub cid: Cid,
    /// The block's content.
    pub data: Bytes,
    /// The address the block was asked for by.
    pub address: BlockAddress,
    /// The inclusion proof in the tree of a [`BlockAddress::Leaf`] address. Ignored (neither
    /// written nor read) for a [`BlockAddress::Cid`] address, as in the reference.
    pub proof: Option<Proof>,
}

/// Whether the sender holds a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The block.
    pub address: BlockAddress,
    /// `true` for `Have`, `false` for `DontHave`.
    pub have: bool,
}

/// One block exchange message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Blocks wanted (always written, even when empty).
    pub wantlist: WantList,
    /// Blocks sent.
    pub deliveries: Vec<Delivery>,
    /// Answers to `WantHave` entries.
    pub presences: Vec<Presence>,
}

// Every field number here is below 16, so each key is one byte.

/// Length of `v` as a varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Length of a varint field holding `v`.
fn uint_len(v: u64) -> usize {
    1 + varint_len(v)
}

/// Length of a length-delimited field with `len` bytes of content.
fn bytes_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Appends the key and length of a length-delimited field whose content follows.
fn put_header(buf: &mut Vec<u8>, field: u32, len: usize) {
    pb::put_varint(buf, u64::from(field) << 3 | u64::from(LEN));
    pb::put_varint(buf, len as u64);
}

/// Parses a CID field.
fn cid_from(bytes: &[u8]) -> Result<Cid, DecodeError> {
    Cid::from_bytes(bytes).map_err(|_| DecodeError("invalid CID"))
}

/// Checks that a field we ignore has the wire type it should.
fn expect_wire(v: pb::Value<'_>, wire: u8, what: &'static str) -> Result<(), DecodeError> {
    match (v, wire) {
        (pb::Value::Uint(_), VARINT) | (pb::Value::Bytes(_), LEN) => Ok(()),
        _ => Err(DecodeError(what)),
    }
}

/// Where the block data of a decoded message comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A borrowed buffer: data is copied out.
    Borrowed,
    /// A shared buffer: data is a slice of it, without copying.
    Shared(&'a Bytes),
}

impl Source<'_> {
    /// `sub`, a subslice of the buffer being decoded, as `Bytes`.
    fn bytes(self, sub: &[u8]) -> Bytes {
        match self {
            Source::Borrowed => Bytes::copy_from_slice(sub),
            // `sub` comes from `Fields` over `buf[..]`, so it lies within `buf`.
            Source::Shared(buf) => buf.slice_ref(sub),
        }
    }
}

impl BlockAddress {
    fn encoded_len(&self) -> usize {
        match self {
            Self::Cid(cid) => uint_len(0) + bytes_len(cid.to_bytes().len()),
            Self::Leaf { tree, index } => {
                uint_len(1) + bytes_len(tree.to_bytes().len()) + uint_len(*index)
            }
        }
    }

    fn encode_into(&self, buf: &mut Vec<u8>) {
        match self {
            Self::Cid(cid) => {
                pb::put_uint(buf, 1, 0);
                pb::put_bytes(buf, 4, &cid.to_bytes());
            }
            Self::Leaf { tree, index } => {
                pb::put_uint(buf, 1, 1);
                pb::put_bytes(buf, 2, &tree.to_bytes());
                pb::put_uint(buf, 3, *index);
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (mut leaf, mut tree, mut index, mut cid) = (false, None, None, None);
        for f in Fields::new(buf) {
            match f? {
                (1, v) => leaf = v.uint("address leaf is not a varint")? != 0,
                (2, v) => tree = Some(cid_from(v.bytes("address treeCid is not bytes")?)?),
                (3, v) => index = Some(v.uint("address index is not a varint")?),
                (4, v) => cid = Some(cid_from(v.bytes("address cid is not bytes")?)?),
                _ => {}
            }
        }
        if leaf {
            match (tree, index) {
                (Some(tree), Some(index)) => Ok(Self::Leaf { tree, index }),
                (None, _) => Err(DecodeError("leaf address without treeCid")),
                (_, None) => Err(DecodeError("leaf address without index")),
            }
        } else {
            cid.map(Self::Cid)
                .ok_or(DecodeError("block address without cid"))
        }
    }
}

impl Entry {
    /// A want for `address`, asking for a DontHave answer when the peer lacks it.
    pub fn want(address: BlockAddress, want_type: WantType) -> Self {
        Self {
            address,
            priority: 0,
            cancel: false,
            want_type,
            send_dont_have: true,
        }
    }

    fn encoded_len(&self) -> usize {
        bytes_len(self.address.encoded_len())
            + uint_len(priority_wire(self.priority))
            + uint_len(u64::from(self.cancel))
            + uint_len(self.want_type as u64)
            + uint_len(u64::from(self.send_dont_have))
    }

    fn encode_into(&self, buf: &mut Vec<u8>) {
        put_header(buf, 1, self.address.encoded_len());
        self.address.encode_into(buf);
        pb::put_uint(buf, 2, priority_wire(self.priority));
        pb::put_uint(buf, 3, u64::from(self.cancel));
        pb::put_uint(buf, 4, self.want_type as u64);
        pb::put_uint(buf, 5, u64::from(self.send_dont_have));
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut address = None;
        let mut entry = (0, false, WantType::Block, false);
        for f in Fields::new(buf) {
            match f? {
                (1, v) => address = Some(BlockAddress::decode(v.bytes("entry address")?)?),
                // protobuf int32: the low 32 bits of the (sign-extended) varint.
                (2, v) => entry.0 = v.uint("entry priority is not a varint")? as i32,
                (3, v) => entry.1 = v.uint("entry cancel is not a varint")? != 0,
                (4, v) => {
                    entry.2 = match v.uint("entry wantType is not a varint")? {
                        0 => WantType::Block,
                        1 => WantType::Have,
                        _ => return Err(DecodeError("unknown wantType")),
                    }
                }
                (5, v) => entry.3 = v.uint("entry sendDontHave is not a varint")? != 0,
                _ => {}
            }
        }
        let (priority, cancel, want_type, send_dont_have) = entry;
        Ok(Self {
            address: address.ok_or(DecodeError("want-list entry without address"))?,
            priority,
            cancel,
            want_type,
            send_dont_have,
        })
    }
}

/// An int32 as protobuf writes it: sign-extended to 64 bits.
fn priority_wire(p: i32) -> u64 {
    i64::from(p) as u64
}

impl WantList {
    fn encoded_len(&self) -> usize {
        self.entries
            .iter()
            .map(|e| bytes_len(e.encoded_len()))
            .sum::<usize>()
            + uint_len(u64::from(self.full))
    }

    fn encode_into(&self, buf: &mut Vec<u8>) {
        for e in &self.entries {
            put_header(buf, 1, e.encoded_len());
            e.encode_into(buf);
        }
        pb::put_uint(buf, 2, u64::from(self.full));
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut list = Self::default();
        for f in Fields::new(buf) {
            match f? {
                (1, v) => list
                    .entries
                    .push(Entry::decode(v.bytes("want-list entry is not bytes")?)?),
                (2, v) => list.full = v.uint("want-list full is not a varint")? != 0,
                _ => {}
            }
        }
        Ok(list)
    }
}

impl Delivery {
    fn wire_proof(&self) -> Option<Vec<u8>> {
        wire_proof(&self.address, self.proof.as_ref())
    }

    fn encoded_len(&self) -> usize {
        delivery_len(
            &self.cid.to_bytes(),
            self.data.len(),
            &self.address,
            self.wire_proof().as_deref(),
        )
    }

    fn encode_into(&self, buf: &mut Vec<u8>, field: u32) {
        let proof = self.wire_proof();
        let cid = self.cid.to_bytes();
        let fill = |b: &mut Vec<u8>| {
            b.extend_from_slice(&self.data);
            Ok::<(), std::convert::Infallible>(())
        };
        let len = self.data.len();
        let _ = put_delivery(buf, field, &cid, &self.address, proof.as_deref(), len, fill);
    }

    fn decode(buf: &[u8], src: Source<'_>) -> Result<Self, DecodeError> {
        let (mut cid, mut data, mut address, mut proof) = (None, None, None, None);
        for f in Fields::new(buf) {
            match f? {
                (1, v) => cid = Some(cid_from(v.bytes("delivery cid is not bytes")?)?),
                (2, v) => data = Some(v.bytes("delivery data is not bytes")?),
                (3, v) => address = Some(BlockAddress::decode(v.bytes("delivery address")?)?),
                (4, v) => proof = Some(v.bytes("delivery proof is not bytes")?),
                _ => {}
            }
        }
        let address = address.ok_or(DecodeError("delivery without address"))?;
        let proof = match (address, proof) {
            (BlockAddress::Leaf { .. }, Some(p)) => {
                Some(Proof::decode(p).map_err(|e| match e {
                    TreeError::Decode(e) => e,
                    _ => DecodeError("invalid delivery proof"),
                })?)
            }
            _ => None,
        };
        Ok(Self {
            cid: cid.ok_or(DecodeError("delivery without cid"))?,
            data: data.map_or_else(Bytes::new, |d| src.bytes(d)),
            address,
            proof,
        })
    }
}

/// The encoded proof of a delivery, written only for a leaf address.
fn wire_proof(address: &BlockAddress, proof: Option<&Proof>) -> Option<Vec<u8>> {
    match address {
        BlockAddress::Leaf { .. } => proof.map(Proof::encode),
        BlockAddress::Cid(_) => None,
    }
}

/// Length of a delivery's content: its CID, `len` bytes of data, its address and its
/// proof, if any.
fn delivery_len(cid: &[u8], len: usize, address: &BlockAddress, proof: Option<&[u8]>) -> usize {
    bytes_len(cid.len())
        + bytes_len(len)
        + bytes_len(address.encoded_len())
        + proof.map_or(0, |p| bytes_len(p.len()))
}

/// Appends a delivery as field `field`: its CID, `len` bytes of data that `fill` appends,
/// its address and its proof, if any. When `fill` fails, or appends other than `len`
/// bytes, `buf` is left as it was: the error, or `Ok(false)`.
fn put_delivery<E>(
    buf: &mut Vec<u8>,
    field: u32,
    cid: &[u8],
    address: &BlockAddress,
    proof: Option<&[u8]>,
    len: usize,
    fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<bool, E> {
    let mark = buf.len();
    let content = delivery_len(cid, len, address, proof);
    buf.reserve(bytes_len(content));
    put_header(buf, field, content);
    pb::put_bytes(buf, 1, cid);
    put_header(buf, 2, len);
    let data = buf.len();
    if let Err(e) = fill(buf) {
        buf.truncate(mark);
        return Err(e);
    }
    if buf.len() != data + len {
        debug_assert!(false, "fill appended {} bytes, not {len}", buf.len() - data);
        buf.truncate(mark);
        return Ok(false);
    }
    put_header(buf, 3, address.encoded_len());
    address.encode_into(buf);
    if let Some(p) = proof {
        pb::put_bytes(buf, 4, p);
    }
    Ok(true)
}

/// The price field of a presence: a 32-byte big-endian zero.
const PRICE: [u8; 32] = [0; 32];

impl Presence {
    fn encoded_len(&self) -> usize {
        bytes_len(self.address.encoded_len()) + uint_len(0) + bytes_len(PRICE.len())
    }

    fn encode_into(&self, buf: &mut Vec<u8>) {
        put_header(buf, 1, self.address.encoded_len());
        self.address.encode_into(buf);
        pb::put_uint(buf, 2, u64::from(!self.have));
        pb::put_bytes(buf, 3, &PRICE);
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (mut address, mut have) = (None, true);
        for f in Fields::new(buf) {
            match f? {
                (1, v) => address = Some(BlockAddress::decode(v.bytes("presence address")?)?),
                (2, v) => {
                    have = match v.uint("presence type is not a varint")? {
                        0 => true,
                        1 => false,
                        _ => return Err(DecodeError("unknown presence type")),
                    }
                }
                (3, v) => expect_wire(v, LEN, "presence price is not bytes")?,
                _ => {}
            }
        }
        Ok(Self {
            address: address.ok_or(DecodeError("presence without address"))?,
            have,
        })
    }
}

/// The trailing fields every reference message carries: `pendingBytes = 0`, an empty
/// account `{1: ""}` and an empty state channel update `{1: ""}`.
const TRAILER: [u8; 10] = [0x28, 0x00, 0x32, 0x02, 0x0a, 0x00, 0x3a, 0x02, 0x0a, 0x00];

impl Message {
    /// A message carrying only these want entries (not a full want list).
    pub fn wants(entries: Vec<Entry>) -> Self {
        Self {
            wantlist: WantList {
                entries,
                full: false,
            },
            ..Self::default()
        }
    }

    /// The length of [`Message::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        bytes_len(self.wantlist.encoded_len())
            + self
                .deliveries
                .iter()
                .map(|d| bytes_len(d.encoded_len()))
                .sum::<usize>()
            + self
                .presences
                .iter()
                .map(|p| bytes_len(p.encoded_len()))
                .sum::<usize>()
            + TRAILER.len()
    }

    /// The protobuf encoding, byte for byte as the reference writes it (zero values and
    /// the trailing fields included).
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf
    }

    fn encode_into(&self, buf: &mut Vec<u8>) {
        put_header(buf, 1, self.wantlist.encoded_len());
        self.wantlist.encode_into(buf);
        for d in &self.deliveries {
            d.encode_into(buf, 3);
        }
        put_tail(buf, &self.presences);
    }

    /// Whether the message carries nothing: no wants, blocks or presences.
    pub fn is_empty(&self) -> bool {
        self.wantlist.entries.is_empty() && self.deliveries.is_empty() && self.presences.is_empty()
    }

    /// Decodes a message, copying block data out of `buf`. Prefer
    /// [`Message::decode_bytes`] when the buffer is already `Bytes`.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_from(buf, Source::Borrowed)
    }

    /// Decodes a message; the block data of its deliveries are slices of `buf`, not copies.
    pub fn decode_bytes(buf: Bytes) -> Result<Self, DecodeError> {
        Self::decode_from(&buf, Source::Shared(&buf))
    }

    fn decode_from(buf: &[u8], src: Source<'_>) -> Result<Self, DecodeError> {
        if buf.len() > MAX_MESSAGE {
            return Err(DecodeError("message exceeds 100 MiB"));
        }
        let mut msg = Self::default();
        for f in Fields::new(buf) {
            match f? {
                (1, v) => msg.wantlist = WantList::decode(v.bytes("want list is not bytes")?)?,
                (3, v) => msg
                    .deliveries
                    .push(Delivery::decode(v.bytes("delivery is not bytes")?, src)?),
                (4, v) => msg
                    .presences
                    .push(Presence::decode(v.bytes("presence is not bytes")?)?),
                (5, v) => expect_wire(v, VARINT, "pendingBytes is not a varint")?,
                (6, v) => expect_wire(v, LEN, "account is not bytes")?,
                (7, v) => expect_wire(v, LEN, "state channel update is not bytes")?,
                _ => {}
            }
        }
        Ok(msg)
    }
}

/// Appends what follows a message's deliveries: its presences, then the trailer.
fn put_tail(buf: &mut Vec<u8>, presences: &[Presence]) {
    for p in presences {
        put_header(buf, 4, p.encoded_len());
        p.encode_into(buf);
    }
    buf.extend_from_slice(&TRAILER);
}

/// An error when a message of `len` bytes exceeds [`MAX_MESSAGE`].
fn within_max(len: usize) -> io::Result<()> {
    if len > MAX_MESSAGE {
        return Err(invalid(format!("message of {len} bytes exceeds 100 MiB")));
    }
    Ok(())
}

/// `msg` as it goes on the wire: its length as an unsigned varint, then its encoding.
pub fn frame(msg: &Message) -> Vec<u8> {
    frame_with_len(msg, msg.encoded_len())
}

/// [`frame`], given `msg.encoded_len()`.
fn frame_with_len(msg: &Message, len: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_frame(msg, len, &mut buf);
    buf
}

/// Appends the frame of `msg`, whose encoded length is `len`, to `buf`.
fn encode_frame(msg: &Message, len: usize, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.reserve(varint_len(len as u64) + len);
    pb::put_varint(buf, len as u64);
    msg.encode_into(buf);
    debug_assert_eq!(buf.len() - start, varint_len(len as u64) + len);
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Reads one framed message from `r`, refusing frames longer than `max` bytes (never more
/// than [`MAX_MESSAGE`]).
///
/// Returns `Ok(None)` when the stream ends cleanly before a frame starts. Errors are
/// `UnexpectedEof` when it ends inside a frame, `InvalidData` for an oversize frame, a
/// malformed length or a malformed message, and whatever `r` fails with. Memory grows
/// with the bytes actually received, not with the announced length.
///
/// # Cancel safety
///
/// Not cancel safe: dropping the future part-way loses the bytes read so far, and the
/// stream is then out of step with its frames; drop the stream too.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<Message>> {
    match read_byte(r).await? {
        None => Ok(None),
        Some(first) => read_rest(r, first, max, None).await.map(Some),
    }
}

/// [`read_message`], except that a frame, once its first byte has arrived, must arrive
/// whole within `frame_time`: a peer cannot hold a half-sent frame (and its buffer) open
/// forever. Waiting for a frame to start has no limit. A late frame is a `TimedOut` error.
/// Frame buffers come from `pool`.
///
/// # Cancel safety
///
/// Not cancel safe, as [`read_message`].
pub async fn read_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    frame_time: std::time::Duration,
    pool: &Arc<FramePool>,
) -> io::Result<Option<Message>> {
    let Some(first) = read_byte(r).await? else {
        return Ok(None);
    };
    match tokio::time::timeout(frame_time, read_rest(r, first, max, Some(pool))).await {
        Ok(r) => r.map(Some),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("a frame took longer than {frame_time:?} to arrive"),
        )),
    }
}

/// The next byte of `r`, or `None` at the end of the stream.
async fn read_byte<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte).await {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(byte[0])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The rest of a frame whose first byte was `first`.
async fn read_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    first: u8,
    max: usize,
    pool: Option<&Arc<FramePool>>,
) -> io::Result<Message> {
    let max = max.min(MAX_MESSAGE);
    let mut len: u64 = 0;
    let mut b = first;
    let mut i = 0;
    loop {
        if i == 9 && b > 1 {
            return Err(invalid("frame length overflows 64 bits"));
        }
        len |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        i += 1;
        if i == 10 {
            return Err(invalid("frame length varint too long"));
        }
        b = read_byte(r)
            .await?
            .ok_or(io::Error::from(io::ErrorKind::UnexpectedEof))?;
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= max)
        .ok_or_else(|| invalid(format!("frame of {len} bytes exceeds the {max}-byte limit")))?;
    if let Some((pool, mut map)) = pool
        .filter(|_| len <= FRAME_BUF)
        .and_then(|p| Some((p, p.receive_buf()?)))
    {
        r.read_exact(&mut map[..len]).await?;
        return Message::decode_bytes(pool.share(map, len)).map_err(invalid);
    }
    // A larger frame first takes its size from the node's large-frame budget, so that no
    // number of peers can make the node hold more than that of them. The buffer then grows
    // as bytes actually arrive, so an announced length alone allocates nothing more.
    let budget = match pool {
        Some(p) => Some(p.reserve_large(len).await),
        None => None,
    };
    let mut buf = Vec::with_capacity(len.min(FRAME_BUF));
    r.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let bytes = match budget {
        Some(b) => FramePool::own(buf, b),
        None => Bytes::from(buf),
    };
    Message::decode_bytes(bytes).map_err(invalid)
}

/// Writes `msg` to `w` as one frame and flushes.
///
/// # Cancel safety
///
/// Not cancel safe: dropping the future part-way may leave a partial frame on the stream,
/// which must then be closed.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> io::Result<()> {
    let mut buf = Vec::new();
    frame_into(msg, &mut buf)?;
    write_frame(w, &buf).await
}

/// Replaces the contents of `buf` with the frame of `msg` (see [`frame`]), so that a
/// caller can reuse buffers and let go of the message before the frame is written. An
/// `InvalidData` error for a message over [`MAX_MESSAGE`].
pub fn frame_into(msg: &Message, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = msg.encoded_len();
    within_max(len)?;
    buf.clear();
    encode_frame(msg, len, buf);
    Ok(())
}

/// Bytes kept in front of a [`DeliveryFrame`] for the message's length, written last: the
/// longest varint of a length within [`MAX_MESSAGE`].
const LEN_ROOM: usize = 4;
const _: () = assert!(MAX_MESSAGE < 1 << (7 * LEN_ROOM));

/// An encoded frame, ready to write: the bytes of [`Frame::bytes`].
#[derive(Debug)]
pub struct Frame {
    buf: Vec<u8>,
    start: usize,
}

impl Frame {
    /// The frame of `msg`, encoded into `buf` (whose contents are dropped).
    pub fn encode(msg: &Message, mut buf: Vec<u8>) -> io::Result<Self> {
        frame_into(msg, &mut buf)?;
        Ok(Self { buf, start: 0 })
    }

    /// The frame's bytes: the message's length as a varint, then the message.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The buffer, to reuse.
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }
}

/// A message of deliveries and presences, encoded as it is built, so that each block can be
/// read from the store straight into its place ([`DeliveryFrame::push_with`]). The frame
/// is byte for byte the [`frame`] of the same [`Message`].
#[derive(Debug)]
pub struct DeliveryFrame {
    buf: Vec<u8>,
    /// Written after the deliveries, in the field order of [`Message::encode`].
    presences: Vec<Presence>,
    blocks: usize,
    data: usize,
}

impl DeliveryFrame {
    /// An empty message, to be encoded into `buf` (whose contents are dropped).
    pub fn new(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.resize(LEN_ROOM, 0);
        let wants = WantList::default();
        put_header(&mut buf, 1, wants.encoded_len());
        wants.encode_into(&mut buf);
        Self {
            buf,
            presences: Vec::new(),
            blocks: 0,
            data: 0,
        }
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0 && self.presences.is_empty()
    }

    /// Deliveries added.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Bytes of block data added.
    pub fn data_bytes(&self) -> usize {
        self.data
    }

    /// Adds a delivery whose block is in hand.
    pub fn push(&mut self, delivery: &Delivery) {
        delivery.encode_into(&mut self.buf, 3);
        self.blocks += 1;
        self.data += delivery.data.len();
    }

    /// Adds a delivery of `len` bytes of block `cid` at `address` (with `proof` for a leaf
    /// address), whose bytes `fill` appends to the buffer it is handed. When `fill` fails,
    /// or appends other than `len` bytes, the delivery is left out.
    pub fn push_with<E>(
        &mut self,
        cid: &Cid,
        address: &BlockAddress,
        proof: &Proof,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let cid = cid.to_bytes();
        let proof = wire_proof(address, Some(proof));
        let proof = proof.as_deref();
        if put_delivery(&mut self.buf, 3, &cid, address, proof, len, fill)? {
            self.blocks += 1;
            self.data += len;
        }
        Ok(())
    }

    /// Adds a presence.
    pub fn presence(&mut self, presence: Presence) {
        self.presences.push(presence);
    }

    /// The finished frame; an error when the message exceeds [`MAX_MESSAGE`].
    pub fn finish(mut self) -> io::Result<Frame> {
        put_tail(&mut self.buf, &self.presences);
        let len = self.buf.len() - LEN_ROOM;
        within_max(len)?;
        let mut head = Vec::with_capacity(LEN_ROOM);
        pb::put_varint(&mut head, len as u64);
        let start = LEN_ROOM - head.len();
        self.buf[start..LEN_ROOM].copy_from_slice(&head);
        Ok(Frame {
            buf: self.buf,
            start,
        })
    }

    /// The buffer, to reuse, when the message is not sent.
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }
}

/// Writes an encoded frame (from [`frame_into`]) to `w` and flushes.
///
/// # Cancel safety
///
/// Not cancel safe, as [`write_message`].
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame).await?;
    w.flush().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::cid::CidKind;
    use crate::merkle::CodexTree;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn block(data: &[u8]) -> Cid {
        Cid::hash_of(CidKind::Block, data)
    }

    fn tree_cid() -> Cid {
        Cid::hash_of(CidKind::Tree, b"tree")
    }

    const TRAILER_HEX: &str = "280032020a003a020a00";

    /// Encodes, checks `encoded_len`, `frame` and both decoders, returns the hex.
    fn check(msg: &Message) -> String {
        let enc = msg.encode();
        assert_eq!(enc.len(), msg.encoded_len());
        let framed = frame(msg);
        let mut s = framed.as_slice();
        assert_eq!(pb::get_varint(&mut s).unwrap(), enc.len() as u64);
        assert_eq!(s, enc.as_slice());
        assert_eq!(&Message::decode(&enc).unwrap(), msg);
        assert_eq!(
            &Message::decode_bytes(Bytes::from(enc.clone())).unwrap(),
            msg
        );
        hex(&enc)
    }

    /// A three-block dataset: its blocks, tree and the proof of block 2.
    fn dataset() -> (Vec<&'static [u8]>, CodexTree) {
        let blocks: Vec<&'static [u8]> = vec![b"block zero", b"block one", b"hello"];
        let tree = CodexTree::new(blocks.iter().map(|b| block(b).digest()).collect()).unwrap();
        (blocks, tree)
    }

    fn sample() -> Message {
        let (blocks, tree) = dataset();
        Message {
            wantlist: WantList {
                entries: vec![
                    Entry {
                        address: BlockAddress::Cid(block(b"x")),
                        priority: -1,
                        cancel: true,
                        want_type: WantType::Block,
                        send_dont_have: true,
                    },
                    Entry {
                        address: BlockAddress::Leaf {
                            tree: tree.cid(),
                            index: u64::MAX,
                        },
                        priority: i32::MAX,
                        cancel: false,
                        want_type: WantType::Have,
                        send_dont_have: false,
                    },
                ],
                full: true,
            },
            deliveries: vec![
                Delivery {
                    cid: block(blocks[2]),
                    data: Bytes::from_static(blocks[2]),
                    address: BlockAddress::Leaf {
                        tree: tree.cid(),
                        index: 2,
                    },
                    proof: Some(tree.proof(2).unwrap()),
                },
                Delivery {
                    cid: block(&[7u8; 70000]),
                    data: Bytes::from(vec![7u8; 70000]),
                    address: BlockAddress::Cid(block(&[7u8; 70000])),
                    proof: None,
                },
                Delivery {
                    cid: block(b""),
                    data: Bytes::new(),
                    address: BlockAddress::Cid(block(b"")),
                    proof: None,
                },
            ],
            presences: vec![
                Presence {
                    address: BlockAddress::Cid(block(b"y")),
                    have: true,
                },
                Presence {
                    address: BlockAddress::Leaf {
                        tree: tree.cid(),
                        index: 0,
                    },
                    have: false,
                },
            ],
        }
    }

    #[test]
    fn empty_message_matches_the_reference() {
        assert_eq!(check(&Message::default()), "0a021000280032020a003a020a00");
        assert_eq!(
            hex(&frame(&Message::default())),
            "0e0a021000280032020a003a020a00"
        );
    }

    #[test]
    fn cid_bytes_are_as_assumed() {
        let c = hex(&block(b"x").to_bytes());
        assert_eq!(c.len(), 76);
        assert!(c.starts_with("01829a031220"), "{c}");
        assert!(hex(&tree_cid().to_bytes()).starts_with("01839a031220"));
    }

    #[test]
    fn want_have_for_a_cid_address() {
        let cid = block(b"x");
        let msg = Message {
            wantlist: WantList {
                entries: vec![Entry {
                    address: BlockAddress::Cid(cid),
                    priority: 0,
                    cancel: false,
                    want_type: WantType::Have,
                    send_dont_have: true,
                }],
                full: false,
            },
            ..Message::default()
        };
        let c = hex(&cid.to_bytes());
        // address (42) = leaf 0, cid; entry (52) = address, priority, cancel, type, dontHave;
        // want list (56) = entry, full.
        let address = format!("08002226{c}");
        let entry = format!("0a2a{address}1000180020012801");
        let want = format!("0a34{entry}1000");
        assert_eq!(check(&msg), format!("0a38{want}{TRAILER_HEX}"));
    }

    #[test]
    fn want_have_for_a_leaf_address() {
        let tree = tree_cid();
        let msg = Message {
            wantlist: WantList {
                entries: vec![Entry {
                    address: BlockAddress::Leaf { tree, index: 300 },
                    priority: 0,
                    cancel: false,
                    want_type: WantType::Have,
                    send_dont_have: false,
                }],
                full: true,
            },
            ..Message::default()
        };
        let t = hex(&tree.to_bytes());
        // address (45) = leaf 1, treeCid, index 300 (ac 02).
        let address = format!("08011226{t}18ac02");
        let entry = format!("0a2d{address}1000180020012800");
        let want = format!("0a37{entry}1001");
        assert_eq!(check(&msg), format!("0a3b{want}{TRAILER_HEX}"));
    }

    #[test]
    fn negative_priority_is_sign_extended() {
        let msg = Message {
            wantlist: WantList {
                entries: vec![Entry {
                    address: BlockAddress::Cid(block(b"x")),
                    priority: -1,
                    cancel: true,
                    want_type: WantType::Block,
                    send_dont_have: false,
                }],
                full: false,
            },
            ..Message::default()
        };
        let c = hex(&block(b"x").to_bytes());
        let entry = format!("0a2a08002226{c}10ffffffffffffffffff0118012000 2800").replace(' ', "");
        // entry (61), want list (65).
        assert_eq!(check(&msg), format!("0a410a3d{entry}1000{TRAILER_HEX}"));
    }

    #[test]
    fn presences() {
        let cid = block(b"y");
        let msg = Message {
            presences: vec![
                Presence {
                    address: BlockAddress::Cid(cid),
                    have: true,
                },
                Presence {
                    address: BlockAddress::Cid(cid),
                    have: false,
                },
            ],
            ..Message::default()
        };
        let c = hex(&cid.to_bytes());
        let price = "00".repeat(32);
        // presence (80) = address (42), type, price (32 bytes).
        let have = format!("0a2a08002226{c}10001a20{price}");
        let dont = format!("0a2a08002226{c}10011a20{price}");
        assert_eq!(
            check(&msg),
            format!("0a02100022 50{have}2250{dont}{TRAILER_HEX}").replace(' ', "")
        );
    }

    #[test]
    fn delivery_with_proof() {
        let (blocks, tree) = dataset();
        let proof = tree.proof(2).unwrap();
        assert_eq!(proof.path.len(), 2);
        let msg = Message {
            deliveries: vec![Delivery {
                cid: block(blocks[2]),
                data: Bytes::from_static(blocks[2]),
                address: BlockAddress::Leaf {
                    tree: tree.cid(),
                    index: 2,
                },
                proof: Some(proof.clone()),
            }],
            ..Message::default()
        };
        let c = hex(&block(blocks[2]).to_bytes());
        let t = hex(&tree.cid().to_bytes());
        let (p0, p1) = (hex(&proof.path[0]), hex(&proof.path[1]));
        // proof (78) = mcodec 0x12, index 2, nleaves 3, two nodes {1: digest}.
        let proof_hex = format!("0812100218032222 0a20{p0}22220a20{p1}").replace(' ', "");
        assert_eq!(proof_hex, hex(&proof.encode()));
        // delivery (173 = ad 01) = cid (38), data "hello", address (44), proof (78).
        let delivery =
            format!("0a26{c}120568656c6c6f1a2c08011226{t}18022 24e{proof_hex}").replace(' ', "");
        let got = check(&msg);
        assert_eq!(got, format!("0a0210001aad01{delivery}{TRAILER_HEX}"));
        let back = Message::decode(&unhex(&got)).unwrap();
        let d = &back.deliveries[0];
        assert!(d.cid.matches(&d.data));
        assert!(d
            .proof
            .as_ref()
            .unwrap()
            .verify(&d.cid.digest(), &tree.root()));
    }

    #[test]
    fn cid_delivery_drops_the_proof() {
        let (_, tree) = dataset();
        let cid = block(b"z");
        let with = Message {
            deliveries: vec![Delivery {
                cid,
                data: Bytes::from_static(b"z"),
                address: BlockAddress::Cid(cid),
                proof: Some(tree.proof(0).unwrap()),
            }],
            ..Message::default()
        };
        let mut without = with.clone();
        without.deliveries[0].proof = None;
        assert_eq!(with.encode(), without.encode());
        assert_eq!(with.encoded_len(), without.encoded_len());
        // A proof field sent anyway is ignored.
        let mut d = Vec::new();
        pb::put_bytes(&mut d, 1, &cid.to_bytes());
        pb::put_bytes(&mut d, 2, b"z");
        let mut a = Vec::new();
        BlockAddress::Cid(cid).encode_into(&mut a);
        pb::put_bytes(&mut d, 3, &a);
        pb::put_bytes(&mut d, 4, b"not a proof at all");
        let mut m = Vec::new();
        pb::put_bytes(&mut m, 3, &d);
        assert_eq!(Message::decode(&m).unwrap(), without);
    }

    #[test]
    fn delivery_frames_match_whole_message_frames() {
        let mut msg = sample();
        msg.wantlist = WantList::default();
        let (_, tree) = dataset();
        let mut built = DeliveryFrame::new(vec![9; 16]);
        for (i, d) in msg.deliveries.iter().enumerate() {
            if i % 2 == 1 {
                built.push(d);
                continue;
            }
            // A proof is written for a leaf address only, as `Delivery::encode` does.
            let proof = d.proof.clone().unwrap_or_else(|| tree.proof(0).unwrap());
            built
                .push_with(&d.cid, &d.address, &proof, d.data.len(), |buf| {
                    buf.extend_from_slice(&d.data);
                    Ok::<(), ()>(())
                })
                .unwrap();
            // A block that cannot be read leaves no trace.
            let failed = built.push_with(&d.cid, &d.address, &proof, 3, |buf| {
                buf.extend_from_slice(b"ab");
                Err("unreadable")
            });
            assert_eq!(failed, Err("unreadable"));
        }
        for p in &msg.presences {
            built.presence(p.clone());
        }
        assert_eq!(built.blocks(), msg.deliveries.len());
        let data: usize = msg.deliveries.iter().map(|d| d.data.len()).sum();
        assert_eq!(built.data_bytes(), data);
        assert_eq!(built.finish().unwrap().bytes(), frame(&msg).as_slice());

        // An empty one is the empty message; a 300-byte block needs a two-byte length.
        let empty = DeliveryFrame::new(Vec::new());
        assert!(empty.is_empty());
        assert_eq!(
            empty.finish().unwrap().bytes(),
            frame(&Message::default()).as_slice()
        );
        let mut one = DeliveryFrame::new(Vec::new());
        let big = vec![1u8; 300];
        let d = Delivery {
            cid: block(&big),
            data: Bytes::from(big),
            address: BlockAddress::Leaf {
                tree: tree.cid(),
                index: 1,
            },
            proof: Some(tree.proof(1).unwrap()),
        };
        one.push(&d);
        let whole = Message {
            deliveries: vec![d],
            ..Message::default()
        };
        assert_eq!(one.finish().unwrap().bytes(), frame(&whole).as_slice());
    }

    #[test]
    fn round_trips() {
        let msg = sample();
        check(&msg);
        let enc = Bytes::from(msg.encode());
        let back = Message::decode_bytes(enc.clone()).unwrap();
        // The big block is a slice of the input, not a copy.
        let data = &back.deliveries[1].data;
        let (start, end) = (enc.as_ptr() as usize, enc.as_ptr() as usize + enc.len());
        assert!((start..end).contains(&(data.as_ptr() as usize)));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut enc = sample().encode();
        pb::put_uint(&mut enc, 9, 12345);
        pb::put_bytes(&mut enc, 15, b"future");
        enc.extend_from_slice(&[0x0d, 1, 2, 3, 4]); // field 1, fixed32
        enc.extend_from_slice(&[0x89, 0x01, 1, 2, 3, 4, 5, 6, 7, 8]); // field 17, fixed64
        assert_eq!(Message::decode(&enc).unwrap(), sample());
        // A missing want list decodes as an empty one.
        assert_eq!(Message::decode(&[]).unwrap(), Message::default());
    }

    /// A message whose single want-list entry has the address `address`.
    fn with_address(address: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        pb::put_bytes(&mut e, 1, address);
        let mut w = Vec::new();
        pb::put_bytes(&mut w, 1, &e);
        let mut m = Vec::new();
        pb::put_bytes(&mut m, 1, &w);
        m
    }

    #[test]
    fn malformed_input_is_an_error() {
        let c = block(b"x").to_bytes();
        let t = tree_cid().to_bytes();
        let mut leaf_no_index = Vec::new();
        pb::put_uint(&mut leaf_no_index, 1, 1);
        pb::put_bytes(&mut leaf_no_index, 2, &t);
        let mut leaf_no_tree = Vec::new();
        pb::put_uint(&mut leaf_no_tree, 1, 1);
        pb::put_uint(&mut leaf_no_tree, 3, 4);
        let mut leaf_with_cid_only = Vec::new();
        pb::put_uint(&mut leaf_with_cid_only, 1, 1);
        pb::put_bytes(&mut leaf_with_cid_only, 4, &c);
        let mut no_cid = Vec::new();
        pb::put_uint(&mut no_cid, 1, 0);
        pb::put_bytes(&mut no_cid, 2, &t);
        let mut bad_cid = Vec::new();
        pb::put_uint(&mut bad_cid, 1, 0);
        pb::put_bytes(&mut bad_cid, 4, &c[..30]);
        let mut v0_cid = Vec::new();
        pb::put_uint(&mut v0_cid, 1, 0);
        pb::put_bytes(&mut v0_cid, 4, &c[4..]);
        let mut leaf_index_as_bytes = Vec::new();
        pb::put_uint(&mut leaf_index_as_bytes, 1, 1);
        pb::put_bytes(&mut leaf_index_as_bytes, 2, &t);
        pb::put_bytes(&mut leaf_index_as_bytes, 3, &[4]);
        for address in [
            leaf_no_index,
            leaf_no_tree,
            leaf_with_cid_only,
            no_cid,
            bad_cid,
            v0_cid,
            leaf_index_as_bytes,
        ] {
            let m = with_address(&address);
            assert!(Message::decode(&m).is_err(), "{}", hex(&m));
        }

        let good = sample().encode();
        let mut bad_want_type = Message::default();
        bad_want_type.wantlist.entries.push(Entry {
            address: BlockAddress::Cid(block(b"x")),
            priority: 0,
            cancel: false,
            want_type: WantType::Have,
            send_dont_have: false,
        });
        let mut bad_want_type = bad_want_type.encode();
        let at = bad_want_type.len() - TRAILER.len() - 6; // `20 01` of wantType
        assert_eq!(bad_want_type[at..at + 2], [0x20, 0x01]);
        bad_want_type[at + 1] = 2;
        for bad in [
            &good[..good.len() - 1],       // truncated inside the trailer
            &good[..good.len() / 2],       // truncated inside a delivery
            &[0x0a, 0x05, 0x10][..],       // length beyond the end
            &[0x0a, 0x80][..],             // truncated length varint
            &[0x28, 0xff, 0xff, 0xff][..], // truncated varint
            &[
                0x28, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ][..], // 70 bits
            &[0x08, 0x00][..],             // want list as a varint
            &[0x2a, 0x00][..],             // pendingBytes as bytes
            &[0x0a, 0x02, 0x0a, 0x00][..], // entry without address
            &[0x22, 0x02, 0x10, 0x00][..], // presence without address
            &[0x1a, 0x00][..],             // delivery without cid or address
            &[0x0b, 0x00][..],             // start-group wire type
            &[0x00, 0x00][..],             // field 0
            &bad_want_type[..],
        ] {
            assert!(Message::decode(bad).is_err(), "{}", hex(bad));
        }
    }

    #[test]
    fn delivery_with_a_bad_proof_is_an_error() {
        let (_, tree) = dataset();
        let mut msg = sample();
        msg.deliveries.truncate(1);
        let good = msg.encode();
        let proof = tree.proof(2).unwrap().encode();
        let at = good.windows(proof.len()).position(|w| w == proof).unwrap();
        let mut bad = good.clone();
        bad[at + 1] = 0x13; // mcodec: not SHA-256
        assert!(Message::decode(&bad).is_err());
        let mut bad = good;
        bad[at + 9] = 0x1f; // first node: 31-byte digest in a 32-byte field
        assert!(Message::decode(&bad).is_err());
    }

    #[test]
    fn oversize_message_is_refused() {
        let big = vec![0u8; MAX_MESSAGE + 1];
        assert!(Message::decode(&big).is_err());
    }

    /// xorshift64*: deterministic noise without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn noise_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut small = sample();
        small.deliveries.remove(1);
        let valid = small.encode();
        for len in 0..valid.len() {
            let _ = Message::decode(&valid[..len]);
            let _ = Message::decode_bytes(Bytes::copy_from_slice(&valid[len..]));
        }
        for _ in 0..20_000 {
            let len = rng.below(64);
            let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = Message::decode(&noise);
            // Flip a few bytes of a valid message.
            let mut m = valid.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(m.len());
                m[i] = rng.next() as u8;
            }
            let cut = rng.below(m.len() + 1);
            if let Ok(msg) = Message::decode_bytes(Bytes::from(m[..cut].to_vec())) {
                // Whatever decodes re-encodes to something that decodes the same.
                assert_eq!(Message::decode(&msg.encode()).unwrap(), msg);
            }
        }
    }

    #[tokio::test]
    async fn pooled_frames_return_once_their_blocks_are_dropped() {
        let pool = FramePool::new();
        let mut scratch = pool.get();
        let mut stream = futures::io::Cursor::new(Vec::new());
        frame_into(&sample(), &mut scratch).unwrap();
        write_frame(&mut stream, &scratch).await.unwrap();
        pool.put(scratch);
        assert_eq!(pool.idle(), (1, 0));
        let bytes = stream.into_inner();
        let limit = std::time::Duration::from_secs(5);
        let mut r = futures::io::Cursor::new(&bytes);
        let msg = read_message_within(&mut r, MAX_MESSAGE, limit, &pool)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(msg, sample());
        let data = msg.deliveries[0].data.clone();
        drop(msg);
        assert_eq!(pool.idle(), (1, 0), "a block still holds the frame");
        drop(data);
        assert_eq!(pool.idle(), (1, 1));
    }

    #[tokio::test]
    async fn large_frames_share_one_budget_that_their_blocks_hold() {
        use super::super::frames::LARGE_FRAMES;
        let pool = FramePool::new();
        let big = vec![9u8; FRAME_BUF + 100_000];
        let msg = Message {
            deliveries: vec![Delivery {
                cid: block(&big),
                data: Bytes::from(big.clone()),
                address: BlockAddress::Cid(block(&big)),
                proof: None,
            }],
            ..Message::default()
        };
        let large = frame(&msg);
        let limit = std::time::Duration::from_secs(5);
        let got = read_message_within(
            &mut futures::io::Cursor::new(&large),
            MAX_MESSAGE,
            limit,
            &pool,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got, msg);
        // The frame's bytes stay taken while any block of it lives.
        let data = got.deliveries[0].data.clone();
        drop(got);
        let taken = LARGE_FRAMES - pool.large_free();
        assert!((big.len()..big.len() + 4096).contains(&taken), "{taken}");
        drop(data);
        assert_eq!(pool.large_free(), LARGE_FRAMES);

        // With the budget taken elsewhere, a large frame waits (here past its time limit)
        // instead of being read into more memory.
        let hog = pool.reserve_large(LARGE_FRAMES).await;
        let short = std::time::Duration::from_millis(200);
        let err = read_message_within(
            &mut futures::io::Cursor::new(&large),
            MAX_MESSAGE,
            short,
            &pool,
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Frames that fit a pooled buffer do not use the budget.
        let small = frame(&sample());
        let got = read_message_within(
            &mut futures::io::Cursor::new(&small),
            MAX_MESSAGE,
            short,
            &pool,
        )
        .await
        .unwrap();
        assert_eq!(got, Some(sample()));
        drop(hog);
        let got = read_message_within(
            &mut futures::io::Cursor::new(&large),
            MAX_MESSAGE,
            limit,
            &pool,
        )
        .await
        .unwrap();
        assert_eq!(got, Some(msg));
    }

    /// A reader that hands out at most one byte per poll.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            if buf.is_empty() || self.0.is_empty() {
                return Poll::Ready(Ok(0));
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Poll::Ready(Ok(1))
        }
    }

    #[tokio::test]
    async fn framing_round_trips() {
        let mut stream = futures::io::Cursor::new(Vec::new());
        write_message(&mut stream, &sample()).await.unwrap();
        write_message(&mut stream, &Message::default())
            .await
            .unwrap();
        let bytes = stream.into_inner();
        assert_eq!(bytes.len(), frame(&sample()).len() + 15);

        let mut r = futures::io::Cursor::new(&bytes);
        assert_eq!(
            read_message(&mut r, MAX_MESSAGE).await.unwrap(),
            Some(sample())
        );
        assert_eq!(
            read_message(&mut r, MAX_MESSAGE).await.unwrap(),
            Some(Message::default())
        );
        assert_eq!(read_message(&mut r, MAX_MESSAGE).await.unwrap(), None);

        let mut r = Trickle(&bytes);
        assert_eq!(
            read_message(&mut r, MAX_MESSAGE).await.unwrap(),
            Some(sample())
        );
        assert_eq!(
            read_message(&mut r, MAX_MESSAGE).await.unwrap(),
            Some(Message::default())
        );
        assert_eq!(read_message(&mut r, MAX_MESSAGE).await.unwrap(), None);
    }

    #[tokio::test]
    async fn framing_errors() {
        async fn read(b: &[u8], max: usize) -> io::Result<Option<Message>> {
            read_message(&mut futures::io::Cursor::new(b), max).await
        }
        let framed = frame(&sample());
        let kind = |r: io::Result<Option<Message>>| r.unwrap_err().kind();

        // EOF inside the length, inside the body.
        assert_eq!(
            kind(read(&framed[..1], MAX_MESSAGE).await),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            kind(read(&framed[..100], MAX_MESSAGE).await),
            io::ErrorKind::UnexpectedEof
        );
        // Oversize: over the caller's limit, over 100 MiB, over 64 bits.
        assert_eq!(kind(read(&framed, 100).await), io::ErrorKind::InvalidData);
        let mut huge = Vec::new();
        pb::put_varint(&mut huge, (MAX_MESSAGE + 1) as u64);
        assert_eq!(
            kind(read(&huge, usize::MAX).await),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            kind(read(&[0xff; 11], MAX_MESSAGE).await),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            kind(
                read(
                    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                    usize::MAX
                )
                .await
            ),
            io::ErrorKind::InvalidData
        );
        // A well-framed but malformed message.
        assert_eq!(
            kind(read(&[0x02, 0x0a, 0x05], MAX_MESSAGE).await),
            io::ErrorKind::InvalidData
        );
        // An empty frame is an empty message.
        assert_eq!(
            read(&[0x00], MAX_MESSAGE).await.unwrap(),
            Some(Message::default())
        );
        assert_eq!(read(&[], MAX_MESSAGE).await.unwrap(), None);
    }

    /// A reader that yields `bytes`, then stalls forever.
    struct Stall(futures::io::Cursor<Vec<u8>>);

    impl AsyncRead for Stall {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            match Pin::new(&mut self.0).poll_read(cx, buf) {
                Poll::Ready(Ok(0)) => Poll::Pending,
                other => other,
            }
        }
    }

    #[tokio::test]
    async fn a_half_sent_frame_times_out_but_an_idle_stream_does_not() {
        let limit = std::time::Duration::from_millis(50);
        let framed = frame(&sample());
        // Whole frames arrive in time.
        let mut r = Stall(futures::io::Cursor::new(framed.clone()));
        assert_eq!(
            read_message_within(&mut r, MAX_MESSAGE, limit, &FramePool::new())
                .await
                .unwrap(),
            Some(sample())
        );
        // A frame that stops half-way is given up.
        let mut r = Stall(futures::io::Cursor::new(
            framed[..framed.len() / 2].to_vec(),
        ));
        let err = read_message_within(&mut r, MAX_MESSAGE, limit, &FramePool::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Waiting for a frame to start is not limited.
        let mut r = Stall(futures::io::Cursor::new(Vec::new()));
        let idle = tokio::time::timeout(
            limit * 4,
            read_message_within(&mut r, MAX_MESSAGE, limit, &FramePool::new()),
        )
        .await;
        assert!(idle.is_err(), "an idle stream must not time out");
    }
}
