//! Messages: `kind(1) ‖ protobuf { 1: request-id (≤ 8 bytes), 2: body }`.
//!
//! Bodies are protobuf written field by field as the reference writes them: every field,
//! even zero or empty. Some integers are fixed-width big-endian byte strings, not varints:
//! FindNode distances (2 bytes), the Pong port (2 bytes), the IP family (1 byte: 0 IPv6,
//! 1 IPv4) and node IDs (32 bytes). SPRs travel as their signed envelope bytes; they are
//! verified by the caller, not here. Newer reference versions append field 3
//! (`client_mode`) to the envelope: it is read and ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::NodeId;
use crate::pb::{self, DecodeError, Fields, Value};

/// Longest request ID.
pub const MAX_REQUEST_ID: usize = 8;

/// A request a node sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Liveness check, carrying the sender's SPR sequence number.
    Ping {
        /// The sender's record seq.
        seq: u64,
    },
    /// The nodes at these log distances from the recipient (0: the recipient itself).
    FindNode {
        /// Log distances, 0..=256.
        distances: Vec<u16>,
    },
    /// An application request (none are registered by the storage node).
    TalkReq {
        /// Protocol name.
        protocol: Vec<u8>,
        /// Request bytes.
        request: Vec<u8>,
    },
    /// Store a provider record under a key; never answered.
    AddProvider {
        /// The content key.
        key: NodeId,
        /// The provider's SPR envelope.
        record: Vec<u8>,
    },
    /// The providers the recipient holds for a key.
    GetProviders {
        /// The content key.
        key: NodeId,
    },
    /// The nodes the recipient knows closest to a target.
    FindNodeFast {
        /// The target ID.
        target: NodeId,
    },
}

/// An answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to Ping: the responder's seq and the requester's address as seen.
    Pong {
        /// The responder's record seq.
        seq: u64,
        /// The requester's IP as the responder saw it.
        ip: IpAddr,
        /// The requester's UDP port as the responder saw it.
        port: u16,
    },
    /// One of `total` messages answering FindNode or FindNodeFast.
    Nodes {
        /// How many Nodes messages make up the answer.
        total: u32,
        /// SPR envelopes.
        records: Vec<Vec<u8>>,
    },
    /// Answer to TalkReq.
    TalkResp {
        /// Response bytes.
        response: Vec<u8>,
    },
    /// Answer to GetProviders.
    Providers {
        /// Messages in the answer (always 1 in the reference).
        total: u32,
        /// SPR envelopes.
        records: Vec<Vec<u8>>,
    },
}

/// A decoded message with its request ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A request.
    Request(Vec<u8>, Request),
    /// A response, carrying the request's ID.
    Response(Vec<u8>, Response),
}

const PING: u8 = 0x01;
const PONG: u8 = 0x02;
const FIND_NODE: u8 = 0x03;
const NODES: u8 = 0x04;
const TALK_REQ: u8 = 0x05;
const TALK_RESP: u8 = 0x06;
const ADD_PROVIDER: u8 = 0x0b;
const GET_PROVIDERS: u8 = 0x0c;
const PROVIDERS: u8 = 0x0d;
const FIND_NODE_FAST: u8 = 0x83;

impl Message {
    /// The encoded plaintext.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let (kind, id) = match self {
            Message::Request(id, r) => (encode_request(r, &mut body), id),
            Message::Response(id, r) => (encode_response(r, &mut body), id),
        };
        let mut out = Vec::with_capacity(body.len() + id.len() + 8);
        out.push(kind);
        pb::put_bytes(&mut out, 1, id);
        pb::put_bytes(&mut out, 2, &body);
        out
    }

    /// Reads a plaintext.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&kind, rest) = bytes.split_first().ok_or(DecodeError("empty message"))?;
        let mut id = None;
        let mut body = None;
        for field in Fields::new(rest) {
            match field? {
                (1, Value::Bytes(b)) => id = Some(b),
                (2, Value::Bytes(b)) => body = Some(b),
                _ => {}
            }
        }
        let id = id.ok_or(DecodeError("no request id"))?;
        if id.len() > MAX_REQUEST_ID {
            return Err(DecodeError("request id longer than 8 bytes"));
        }
        let body = body.ok_or(DecodeError("no message body"))?;
        let id = id.to_vec();
        Ok(match kind {
            PING => Message::Request(
                id,
                Request::Ping {
                    seq: required_uint(body, 1)?,
                },
            ),
            FIND_NODE => {
                let mut distances = Vec::new();
                for field in Fields::new(body) {
                    if let (1, Value::Bytes(b)) = field? {
                        let d: [u8; 2] = b.try_into().map_err(|_| DecodeError("distance"))?;
                        distances.push(u16::from_be_bytes(d));
                    }
                }
                if distances.is_empty() {
                    return Err(DecodeError("FindNode without distances"));
                }
                Message::Request(id, Request::FindNode { distances })
            }
            TALK_REQ => Message::Request(
                id,
                Request::TalkReq {
                    protocol: required_bytes(body, 1)?.to_vec(),
                    request: required_bytes(body, 2)?.to_vec(),
                },
            ),
            ADD_PROVIDER => Message::Request(
                id,
                Request::AddProvider {
                    key: node_id(required_bytes(body, 1)?)?,
                    record: required_bytes(body, 2)?.to_vec(),
                },
            ),
            GET_PROVIDERS => Message::Request(
                id,
                Request::GetProviders {
                    key: node_id(required_bytes(body, 1)?)?,
                },
            ),
            FIND_NODE_FAST => Message::Request(
                id,
                Request::FindNodeFast {
                    target: node_id(required_bytes(body, 1)?)?,
                },
            ),
            PONG => {
                let seq = required_uint(body, 1)?;
                let ip = ip_address(required_bytes(body, 2)?)?;
                let port: [u8; 2] = required_bytes(body, 3)?
                    .try_into()
                    .map_err(|_| DecodeError("port is not 2 bytes"))?;
                Message::Response(
                    id,
                    Response::Pong {
                        seq,
                        ip,
                        port: u16::from_be_bytes(port),
                    },
                )
            }
            NODES | PROVIDERS => {
                let total = u32::try_from(required_uint(body, 1)?)
                    .map_err(|_| DecodeError("total exceeds 32 bits"))?;
                let mut records = Vec::new();
                for field in Fields::new(body) {
                    if let (2, Value::Bytes(b)) = field? {
                        records.push(b.to_vec());
                    }
                }
                let r = if kind == NODES {
                    Response::Nodes { total, records }
                } else {
                    Response::Providers { total, records }
                };
                Message::Response(id, r)
            }
            TALK_RESP => Message::Response(
                id,
                Response::TalkResp {
                    response: required_bytes(body, 2)?.to_vec(),
                },
            ),
            _ => return Err(DecodeError("unknown message kind")),
        })
    }
}

fn encode_request(r: &Request, body: &mut Vec<u8>) -> u8 {
    match r {
        Request::Ping { seq } => {
            pb::put_uint(body, 1, *seq);
            PING
        }
        Request::FindNode { distances } => {
            for d in distances {
                pb::put_bytes(body, 1, &d.to_be_bytes());
            }
            FIND_NODE
        }
        Request::TalkReq { protocol, request } => {
            pb::put_bytes(body, 1, protocol);
            pb::put_bytes(body, 2, request);
            TALK_REQ
        }
        Request::AddProvider { key, record } => {
            pb::put_bytes(body, 1, &key.0);
            pb::put_bytes(body, 2, record);
            ADD_PROVIDER
        }
        Request::GetProviders { key } => {
            pb::put_bytes(body, 1, &key.0);
            GET_PROVIDERS
        }
        Request::FindNodeFast { target } => {
            pb::put_bytes(body, 1, &target.0);
            FIND_NODE_FAST
        }
    }
}

fn encode_response(r: &Response, body: &mut Vec<u8>) -> u8 {
    match r {
        Response::Pong { seq, ip, port } => {
            pb::put_uint(body, 1, *seq);
            let mut addr = Vec::with_capacity(22);
            match ip {
                IpAddr::V4(v4) => {
                    pb::put_bytes(&mut addr, 1, &[1]);
                    pb::put_bytes(&mut addr, 2, &v4.octets());
                }
                IpAddr::V6(v6) => {
                    pb::put_bytes(&mut addr, 1, &[0]);
                    pb::put_bytes(&mut addr, 2, &v6.octets());
                }
            }
            pb::put_bytes(body, 2, &addr);
            pb::put_bytes(body, 3, &port.to_be_bytes());
            PONG
        }
        Response::Nodes { total, records } | Response::Providers { total, records } => {
            pb::put_uint(body, 1, u64::from(*total));
            for rec in records {
                pb::put_bytes(body, 2, rec);
            }
            if matches!(r, Response::Nodes { .. }) {
                NODES
            } else {
                PROVIDERS
            }
        }
        Response::TalkResp { response } => {
            pb::put_bytes(body, 2, response);
            TALK_RESP
        }
    }
}

/// The last occurrence of varint field `n`.
fn required_uint(body: &[u8], n: u32) -> Result<u64, DecodeError> {
    let mut found = None;
    for field in Fields::new(body) {
        if let (f, Value::Uint(v)) = field? {
            if f == n {
                found = Some(v);
            }
        }
    }
    found.ok_or(DecodeError("a required varint field is missing"))
}

/// The last occurrence of bytes field `n`.
fn required_bytes(body: &[u8], n: u32) -> Result<&[u8], DecodeError> {
    let mut found = None;
    for field in Fields::new(body) {
        if let (f, Value::Bytes(v)) = field? {
            if f == n {
                found = Some(v);
            }
        }
    }
    found.ok_or(DecodeError("a required bytes field is missing"))
}

fn node_id(b: &[u8]) -> Result<NodeId, DecodeError> {
    Ok(NodeId(
        b.try_into()
            .map_err(|_| DecodeError("node id is not 32 bytes"))?,
    ))
}

fn ip_address(b: &[u8]) -> Result<IpAddr, DecodeError> {
    let family = required_bytes(b, 1)?;
    let addr = required_bytes(b, 2)?;
    match (family, addr.len()) {
        ([1], 4) => {
            let o: [u8; 4] = addr.try_into().map_err(|_| DecodeError("ipv4"))?;
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        ([0], 16) => {
            let o: [u8; 16] = addr.try_into().map_err(|_| DecodeError("ipv6"))?;
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => Err(DecodeError("IP address family and length do not match")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        super::super::crypto::tests_hex(s)
    }

    fn round_trip(m: Message, wire: &str) {
        assert_eq!(m.encode(), hex(wire), "{m:?}");
        assert_eq!(Message::decode(&hex(wire)).unwrap(), m);
    }

    fn req(r: Request) -> Message {
        Message::Request(vec![1], r)
    }

    fn resp(r: Response) -> Message {
        Message::Response(vec![1], r)
    }

    // "Protocol Message Encodings" of tests/discv5/test_discoveryv5_encoding.nim.
    #[test]
    fn reference_message_vectors() {
        round_trip(req(Request::Ping { seq: 1 }), "010a010112020801");
        round_trip(
            resp(Response::Pong {
                seq: 1,
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 5000,
            }),
            "020a01011211080112090a010112047f0000011a021388",
        );
        round_trip(
            req(Request::FindNode {
                distances: vec![256],
            }),
            "030a010112040a020100",
        );
        round_trip(
            resp(Response::Nodes {
                total: 1,
                records: vec![],
            }),
            "040a010112020801",
        );
        round_trip(
            req(Request::TalkReq {
                protocol: b"echo".to_vec(),
                request: b"hi".to_vec(),
            }),
            "050a0101120a0a046563686f12026869",
        );
        round_trip(
            resp(Response::TalkResp {
                response: b"hi".to_vec(),
            }),
            "060a0101120412026869",
        );
        // A 9-byte request ID, and a Pong whose IP field is garbage, are refused.
        assert!(Message::decode(&hex("010a0900010203040506070812020801")).is_err());
        assert!(Message::decode(&hex("02cb0101857f00000102821388")).is_err());
        // The newer envelope's client_mode field is ignored.
        assert_eq!(
            Message::decode(&hex("010a0101120208011800")).unwrap(),
            req(Request::Ping { seq: 1 })
        );
    }

    #[test]
    fn provider_message_encodings() {
        let key = NodeId(
            hex("9c2340e844ea7c4a8bfbe9f81b97b5374d853afe11de4a1f1c204bffd2919a23")
                .try_into()
                .unwrap(),
        );
        round_trip(
            req(Request::GetProviders { key }),
            "0c0a010112220a209c2340e844ea7c4a8bfbe9f81b97b5374d853afe11de4a1f1c204bffd2919a23",
        );
        round_trip(
            resp(Response::Providers {
                total: 1,
                records: vec![],
            }),
            "0d0a010112020801",
        );
        round_trip(
            req(Request::AddProvider {
                key,
                record: vec![0xaa; 3],
            }),
            "0b0a010112270a209c2340e844ea7c4a8bfbe9f81b97b5374d853afe11de4a1f1c204bffd2919a231203aaaaaa",
        );
        round_trip(
            req(Request::FindNodeFast { target: key }),
            "830a010112220a209c2340e844ea7c4a8bfbe9f81b97b5374d853afe11de4a1f1c204bffd2919a23",
        );
        round_trip(
            req(Request::FindNode {
                distances: vec![256, 255, 254],
            }),
            "030a0101120c0a0201000a0200ff0a0200fe",
        );
        round_trip(
            Message::Request(
                hex("0102030405060708"),
                Request::Ping { seq: 1_700_000_000 },
            ),
            "010a08010203040506070812060880e2cfaa06",
        );
        round_trip(
            resp(Response::Pong {
                seq: 1,
                ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
                port: 8090,
            }),
            "020a0101121d080112150a01001210000000000000000000000000000000011a021f9a",
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        for bad in [
            "",                                            // nothing
            "01",                                          // no envelope
            "010a0101",                                    // no body
            "011202 0801",                                 // no request id
            "070a010112020801",                            // a topic message kind
            "030a01011200",                                // FindNode without distances
            "030a010112030a0101",                          // a 1-byte distance
            "0c0a010112030a0101",                          // a short key
            "020a0101120e08011206 0a0101120 17f 1a021388", // a 1-byte IPv4 address
        ] {
            let wire = hex(&bad.replace(' ', ""));
            assert!(Message::decode(&wire).is_err(), "{bad} decoded");
        }
    }
}
