//! What is answered how (see `docs/dns.md`): one message in, one
//! [`Decision`] out. Pure and synchronous: [`decode`] turns bytes into a
//! request (with hickory-proto), [`respond`] decides the response code, the
//! flags and which records go in, and [`Reply::message`] is the response
//! for hickory-server's encoder. Reading and writing sockets is `udp.rs`
//! and `server.rs`.
//!
//! The question is echoed exactly as it arrived (hickory-server's `Queries`
//! keeps its bytes), case included, for clients that use the 0x20 bit;
//! answer records carry the question's spelling too, so `WeB.Vm.` gets
//! `WeB.Vm. A …`.

use std::iter;
use std::sync::LazyLock;

use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder, DecodeError,
};
use hickory_proto::ProtoError;
use hickory_server::zone_handler::{
    MessageRequest, MessageResponse, MessageResponseBuilder, Queries,
};

use crate::name::query_key;
use crate::records::{Lookup, Snapshot, Zone};

/// Largest UDP response we offer through EDNS (the DNS Flag Day 2020 size:
/// no IP fragmentation on any sane path). hickory-server caps UDP
/// responses at this (512 without EDNS).
pub(crate) const SERVER_UDP_PAYLOAD: u16 = 1232;
/// A DNS header's size; anything shorter gets no response.
pub(crate) const HEADER_LEN: usize = 12;

/// A question section with no question, for responses that must not echo
/// one (hickory-server's builder always takes one).
static NO_QUESTION: LazyLock<Queries> = LazyLock::new(|| {
    Queries::read(&mut BinDecoder::new(&[]), 0).unwrap_or_else(|_| unreachable!("0 questions"))
});

/// The OPT record of our responses: version 0, 1232 bytes, no options.
pub(crate) fn server_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(SERVER_UDP_PAYLOAD);
    edns
}

/// What became of one request that gets a response.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// An answer (or a refusal) with this code.
    Answered(ResponseCode),
    /// FORMERR.
    Malformed(Malformed),
}

/// Why a request got FORMERR.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("request is {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("request has {0} questions, not 1")]
    QuestionCount(usize),
    #[error("query carries answer or authority records")]
    RecordsInQuery,
    #[error("cannot decode request")]
    Decode(#[source] ProtoError),
}

/// Why a request got no response at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Shorter than a header: nothing to answer to.
    TooShort(usize),
    /// The QR bit says it is a response; answering could start a loop
    /// between two servers or reflect traffic.
    NotAQuery,
    /// The client is over its query rate (UDP).
    OverRate,
    /// The source cannot be answered: port 0, or an unspecified or
    /// broadcast address (UDP; what hickory-server's `Server` refuses).
    Unanswerable,
    /// Handling the request panicked (a bug).
    Panicked,
}

/// One request's fate. Lives on the stack for one request (never in a
/// collection), so a large `Reply` is fine unboxed.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Decision {
    Reply(Reply),
    Drop(Dropped),
}

/// The answer section of a [`Reply`].
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // as `Decision`
pub(crate) enum Answer {
    None,
    /// The A record, under the question's spelling.
    Address(Record),
    Soa,
    Ns,
    SoaAndNs,
}

/// A response, before hickory-server encodes it.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) meta: Metadata,
    /// Echo the request's question section (otherwise it is left empty).
    pub(crate) echo_question: bool,
    /// Add our OPT record (the request had one).
    pub(crate) edns: bool,
    pub(crate) answer: Answer,
    /// The zone's SOA in the authority section (negative answers).
    pub(crate) soa_in_authority: bool,
    pub(crate) outcome: Outcome,
}

impl Reply {
    fn new(request: &Metadata, code: ResponseCode, outcome: Outcome) -> Self {
        let mut meta = Metadata::response_from_request(request);
        meta.response_code = code;
        Self {
            meta,
            echo_question: false,
            edns: false,
            answer: Answer::None,
            soa_in_authority: false,
            outcome,
        }
    }

    fn formerr(request: &Metadata, why: Malformed) -> Self {
        Self::new(request, ResponseCode::FormErr, Outcome::Malformed(why))
    }

    fn answered(request: &Metadata, code: ResponseCode) -> Self {
        Self::new(request, code, Outcome::Answered(code))
    }

    /// Sets the code of a reply that is already under way.
    fn code(mut self, code: ResponseCode) -> Self {
        self.meta.response_code = code;
        self.outcome = Outcome::Answered(code);
        self
    }

    /// The message to hand to hickory-server: `question` is the request's
    /// question section, echoed if the reply says so.
    pub(crate) fn message<'q, 'a>(
        &'a self,
        question: &'q Queries,
        edns: &'q Edns,
        zone: &'a Zone,
        records: &'a Snapshot,
    ) -> MessageResponse<
        'q,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    > {
        let question: &Queries = if self.echo_question {
            question
        } else {
            &NO_QUESTION
        };
        let (first, second) = match &self.answer {
            Answer::None => (None, None),
            Answer::Address(record) => (Some(record), None),
            Answer::Soa => (Some(&records.soa), None),
            Answer::Ns => (Some(&zone.ns), None),
            Answer::SoaAndNs => (Some(&records.soa), Some(&zone.ns)),
        };
        let authority = self.soa_in_authority.then_some(&records.soa);
        MessageResponseBuilder::new(question, self.edns.then_some(edns)).build(
            self.meta,
            first.into_iter().chain(second),
            authority,
            iter::empty(),
            iter::empty(),
        )
    }
}

/// Encodes `reply` into `out` (cleared first) as hickory-server encodes a
/// UDP response: at most `max` bytes, records that do not fit left out
/// with the TC bit set. If encoding fails, `out` holds a bare SERVFAIL
/// with the request's id instead and the error is returned (for the log).
pub(crate) fn encode(
    reply: &Reply,
    question: &Queries,
    edns: &Edns,
    zone: &Zone,
    records: &Snapshot,
    max: u16,
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(max);
    let error = match reply
        .message(question, edns, zone, records)
        .destructive_emit(&mut encoder)
    {
        Ok(_) => return Ok(()),
        Err(error) => error,
    };
    out.clear();
    let mut metadata = Metadata::new(reply.meta.id, MessageType::Response, OpCode::Query);
    metadata.response_code = ResponseCode::ServFail;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    header.emit(&mut BinEncoder::new(out))?;
    Err(error)
}

/// Everything a decision needs besides the request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    pub(crate) zone: &'a Zone,
    pub(crate) records: &'a Snapshot,
    /// Larger requests get FORMERR.
    pub(crate) max_request: usize,
}

/// Decodes one message the way hickory-server's `Server` does before it
/// calls a handler: nothing for a message shorter than a header, FORMERR
/// (from the header) for one that cannot be decoded, and nothing when that
/// header says it is a response. Reads `raw` in place: the UDP loop
/// (`udp.rs`) decodes from its receive buffers, the TCP connections
/// (`server.rs`) from hickory-server's frames.
#[allow(clippy::result_large_err)] // as `Decision`; `MessageRequest` is as large
pub(crate) fn decode(raw: &[u8]) -> Result<MessageRequest, Decision> {
    let mut decoder = BinDecoder::new(raw);
    let Ok(header) = Header::read(&mut decoder) else {
        return Err(Decision::Drop(Dropped::TooShort(raw.len())));
    };
    read_request(&mut decoder, header).map_err(|error| {
        if header.metadata.message_type == MessageType::Response {
            Decision::Drop(Dropped::NotAQuery)
        } else {
            Decision::Reply(Reply::formerr(
                &header.metadata,
                Malformed::Decode(error.into()),
            ))
        }
    })
}

/// The body of a request after its header: what hickory-server's
/// `MessageRequest::read` does (crate-private there, and only reachable
/// through `Request::from_bytes`, which wants the bytes as an owned `Vec`).
/// The tests hold the two to the same result.
fn read_request(
    decoder: &mut BinDecoder<'_>,
    header: Header,
) -> Result<MessageRequest, DecodeError> {
    let Header {
        mut metadata,
        counts,
    } = header;
    let op = metadata.op_code;
    let queries = Queries::read(decoder, usize::from(counts.queries))?;
    let (answers, _, _) = Message::read_records(decoder, usize::from(counts.answers), false, op)?;
    let (authorities, _, _) =
        Message::read_records(decoder, usize::from(counts.authorities), false, op)?;
    let (additionals, edns, signature) =
        Message::read_records(decoder, usize::from(counts.additionals), true, op)?;
    if let Some(edns) = &edns {
        metadata.merge_response_code(edns.rcode_high());
    }
    Ok(MessageRequest {
        metadata,
        queries,
        answers,
        authorities,
        additionals,
        signature,
        edns,
    })
}

/// The empty question section (for replies that are not about a decoded
/// request).
pub(crate) fn no_question() -> &'static Queries {
    &NO_QUESTION
}

/// FORMERR for a request over the size limit, from its header alone.
pub(crate) fn too_large(header: &Metadata, size: usize) -> Decision {
    if header.message_type == MessageType::Response {
        return Decision::Drop(Dropped::NotAQuery);
    }
    Decision::Reply(Reply::formerr(header, Malformed::TooLarge(size)))
}

/// Decides the response to `request`, which was `size` bytes on the wire.
pub(crate) fn respond(cx: &Context<'_>, request: &MessageRequest, size: usize) -> Decision {
    let meta = &request.metadata;
    if meta.message_type == MessageType::Response {
        return Decision::Drop(Dropped::NotAQuery);
    }
    if size > cx.max_request {
        return too_large(meta, size);
    }
    if meta.op_code != OpCode::Query {
        return Decision::Reply(Reply::answered(meta, ResponseCode::NotImp));
    }
    let [query] = request.queries.queries() else {
        let count = request.queries.len();
        return Decision::Reply(Reply::formerr(meta, Malformed::QuestionCount(count)));
    };
    let query = query.original();
    let mut reply = Reply::answered(meta, ResponseCode::NoError);
    reply.echo_question = true;
    if !request.answers.is_empty() || !request.authorities.is_empty() {
        reply.meta.response_code = ResponseCode::FormErr;
        reply.outcome = Outcome::Malformed(Malformed::RecordsInQuery);
        return Decision::Reply(reply);
    }
    if let Some(theirs) = &request.edns {
        reply.edns = true;
        if theirs.version() > 0 {
            // RFC 6891 §6.1.3: we speak version 0 only.
            return Decision::Reply(reply.code(ResponseCode::BADVERS));
        }
    }

    let in_zone = matches!(query.query_class, DNSClass::IN | DNSClass::ANY)
        .then(|| cx.zone.name.relative_len(&query.name))
        .flatten();
    let Some(relative) = in_zone else {
        return Decision::Reply(reply.code(ResponseCode::Refused));
    };
    if matches!(query.query_type, RecordType::AXFR | RecordType::IXFR) {
        return Decision::Reply(reply.code(ResponseCode::Refused));
    }
    reply.meta.authoritative = true;

    if relative == 0 {
        match query.query_type {
            RecordType::SOA => reply.answer = Answer::Soa,
            RecordType::NS => reply.answer = Answer::Ns,
            RecordType::ANY => reply.answer = Answer::SoaAndNs,
            _ => reply.soa_in_authority = true,
        }
        return Decision::Reply(reply);
    }
    let mut buf = [0u8; 256];
    let found = match query_key(&query.name, relative, &mut buf) {
        Some(key) => cx.records.lookup(key),
        None => Lookup::Missing,
    };
    match found {
        Lookup::Address(ip) if matches!(query.query_type, RecordType::A | RecordType::ANY) => {
            reply.answer = Answer::Address(Record::from_rdata(
                query.name.clone(),
                cx.zone.ttl,
                RData::A(A(ip)),
            ));
        }
        Lookup::Address(_) | Lookup::EmptyNonTerminal => reply.soa_in_authority = true,
        Lookup::Missing => {
            reply = reply.code(ResponseCode::NXDomain);
            reply.soa_in_authority = true;
        }
    }
    Decision::Reply(reply)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::rdata::NS;
    use hickory_proto::rr::Name;
    use std::net::SocketAddr;

    use hickory_server::net::xfer::Protocol;
    use hickory_server::server::Request;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::Records;

    const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    struct Fixture {
        zone: Arc<Zone>,
        records: Records,
    }

    impl Fixture {
        fn new() -> Self {
            let zone = Arc::new(Zone::new("vm.", 5).expect("zone"));
            let records = Records::new(zone.clone());
            records.set("web", WEB).expect("set web");
            records
                .set("api.prod", Ipv4Addr::new(10, 0, 0, 3))
                .expect("set api.prod");
            Self { zone, records }
        }

        fn ask_bytes(&self, request: &[u8]) -> (Decision, Vec<u8>) {
            let snapshot = self.records.subscribe().borrow().clone();
            let cx = Context {
                zone: &self.zone,
                records: &snapshot,
                max_request: 4096,
            };
            let (decision, parsed) = match decode(request) {
                Ok(parsed) => (respond(&cx, &parsed, request.len()), Some(parsed)),
                Err(decision) => (decision, None),
            };
            let mut out = Vec::new();
            if let Decision::Reply(reply) = &decision {
                let question = parsed.as_ref().map_or(&*NO_QUESTION, |p| &p.queries);
                let edns = server_edns();
                let mut encoder = BinEncoder::new(&mut out);
                reply
                    .message(question, &edns, &self.zone, &snapshot)
                    .destructive_emit(&mut encoder)
                    .expect("encode response");
            }
            (decision, out)
        }

        fn ask(&self, request: &Message) -> Message {
            let bytes = request.to_vec().expect("encode request");
            let (decision, out) = self.ask_bytes(&bytes);
            assert!(matches!(decision, Decision::Reply(_)), "{decision:?}");
            let response = Message::from_vec(&out).expect("decode response");
            assert_eq!(response.metadata.id, request.metadata.id);
            assert_eq!(response.metadata.message_type, MessageType::Response);
            response
        }
    }

    fn malformed(decision: &Decision) -> Option<&Malformed> {
        match decision {
            Decision::Reply(Reply {
                outcome: Outcome::Malformed(why),
                ..
            }) => Some(why),
            _ => None,
        }
    }

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        m
    }

    fn with_edns(mut m: Message) -> Message {
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        m.set_edns(edns);
        m
    }

    fn soa_serial(r: &Record) -> u32 {
        match &r.data {
            RData::SOA(soa) => soa.serial,
            other => panic!("not an SOA: {other:?}"),
        }
    }

    #[test]
    fn known_name_gets_its_address_authoritatively() {
        let f = Fixture::new();
        let r = f.ask(&query("web.vm.", RecordType::A));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(r.metadata.recursion_desired, "RD is copied");
        assert!(!r.metadata.recursion_available);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(WEB)));
        assert_eq!(r.answers[0].ttl, 5);
        assert!(r.authorities.is_empty());
    }

    #[test]
    fn case_is_echoed_but_ignored_for_lookup() {
        let f = Fixture::new();
        let r = f.ask(&query("WeB.vM.", RecordType::A));
        assert!(r.queries[0]
            .name
            .eq_case(&Name::from_ascii("WeB.vM.").expect("name")));
        assert!(r.answers[0]
            .name
            .eq_case(&Name::from_ascii("WeB.vM.").expect("name")));
        assert_eq!(r.answers[0].data, RData::A(A(WEB)));
    }

    #[test]
    fn unknown_name_is_nxdomain_with_soa() {
        let f = Fixture::new();
        let r = f.ask(&query("nope.vm.", RecordType::A));
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        assert_eq!(r.authorities.len(), 1);
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(soa_serial(&r.authorities[0]), f.records.serial());
        // Below an existing name is nothing either.
        let r = f.ask(&query("x.web.vm.", RecordType::A));
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn other_types_for_a_known_name_are_nodata() {
        let f = Fixture::new();
        for rtype in [
            RecordType::AAAA,
            RecordType::MX,
            RecordType::TXT,
            RecordType::SOA,
        ] {
            let r = f.ask(&query("web.vm.", rtype));
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{rtype}");
            assert!(r.metadata.authoritative);
            assert!(r.answers.is_empty(), "{rtype}");
            assert_eq!(r.authorities[0].record_type(), RecordType::SOA, "{rtype}");
        }
        // ANY gets the A record.
        let r = f.ask(&query("web.vm.", RecordType::ANY));
        assert_eq!(r.answers[0].data, RData::A(A(WEB)));
    }

    #[test]
    fn empty_non_terminal_is_nodata() {
        let f = Fixture::new();
        let r = f.ask(&query("prod.vm.", RecordType::A));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let r = f.ask(&query("API.prod.vm.", RecordType::A));
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(10, 0, 0, 3))));
    }

    #[test]
    fn apex_answers_soa_and_ns() {
        let f = Fixture::new();
        let r = f.ask(&query("vm.", RecordType::SOA));
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        let RData::SOA(soa) = &r.answers[0].data else {
            panic!("{:?}", r.answers)
        };
        assert_eq!(soa.mname, Name::from_ascii("ns.vm.").expect("name"));
        assert_eq!(soa.rname, Name::from_ascii("hostmaster.vm.").expect("name"));
        assert_eq!(soa.minimum, 5);

        let r = f.ask(&query("Vm.", RecordType::NS));
        assert_eq!(
            r.answers[0].data,
            RData::NS(NS(Name::from_ascii("ns.vm.").expect("name")))
        );
        let r = f.ask(&query("vm.", RecordType::ANY));
        assert_eq!(r.answers.len(), 2);
        let r = f.ask(&query("vm.", RecordType::A));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn outside_the_zone_is_refused() {
        let f = Fixture::new();
        for name in ["example.com.", "vm.example.", ".", "localhost."] {
            let r = f.ask(&query(name, RecordType::A));
            assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(!r.metadata.authoritative, "{name}");
            assert!(r.answers.is_empty() && r.authorities.is_empty(), "{name}");
        }
        let mut chaos = query("web.vm.", RecordType::TXT);
        chaos.queries[0].query_class = DNSClass::CH;
        assert_eq!(f.ask(&chaos).metadata.response_code, ResponseCode::Refused);
        let r = f.ask(&query("vm.", RecordType::AXFR));
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn edns_is_answered_with_edns() {
        let f = Fixture::new();
        let r = f.ask(&with_edns(query("web.vm.", RecordType::A)));
        let edns = r.edns.expect("OPT in response");
        assert_eq!(edns.max_payload(), SERVER_UDP_PAYLOAD);
        assert_eq!(edns.version(), 0);
        let r = f.ask(&query("web.vm.", RecordType::A));
        assert!(r.edns.is_none());

        let mut v1 = with_edns(query("web.vm.", RecordType::A));
        v1.edns.as_mut().expect("edns").set_version(1);
        let r = f.ask(&v1);
        // BADVERS shares code 16 with BADSIG, which is what decodes.
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn bad_shapes_get_formerr() {
        let f = Fixture::new();
        let mut two = query("web.vm.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("db.vm.").expect("name"),
            RecordType::A,
        ));
        let r = f.ask(&two);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert!(r.queries.is_empty());

        let mut none = query("web.vm.", RecordType::A);
        none.queries.clear();
        assert_eq!(f.ask(&none).metadata.response_code, ResponseCode::FormErr);

        let mut answers = query("web.vm.", RecordType::A);
        answers.add_answer(Record::from_rdata(
            Name::from_ascii("web.vm.").expect("name"),
            5,
            RData::A(A(WEB)),
        ));
        assert_eq!(
            f.ask(&answers).metadata.response_code,
            ResponseCode::FormErr
        );

        let mut notify = query("vm.", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(f.ask(&notify).metadata.response_code, ResponseCode::NotImp);
    }

    #[test]
    fn truncated_requests_get_formerr_or_nothing() {
        let f = Fixture::new();
        let full = with_edns(query("web.vm.", RecordType::A))
            .to_vec()
            .expect("encode");
        for len in 0..full.len() {
            let (decision, out) = f.ask_bytes(&full[..len]);
            if len < HEADER_LEN {
                assert!(
                    matches!(decision, Decision::Drop(Dropped::TooShort(_))),
                    "{len}"
                );
                assert!(out.is_empty());
            } else {
                assert!(malformed(&decision).is_some(), "{len}: {decision:?}");
                let r = Message::from_vec(&out).expect("decode");
                assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
            }
        }
    }

    #[test]
    fn long_labels_and_names_get_formerr() {
        let f = Fixture::new();
        // A 64-byte label: its length octet 0x40 is not a valid label type.
        let mut req = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 64];
        req.extend([b'a'; 64]);
        req.extend(b"\x02vm\x00\x00\x01\x00\x01");
        let (decision, out) = f.ask_bytes(&req);
        assert!(
            matches!(malformed(&decision), Some(Malformed::Decode(_))),
            "{decision:?}"
        );
        let r = Message::from_vec(&out).expect("decode");
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);

        // Five 63-byte labels: 321 bytes, over 255.
        let mut req = vec![0x12, 0x35, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            req.push(63);
            req.extend([b'a'; 63]);
        }
        req.extend(b"\x02vm\x00\x00\x01\x00\x01");
        let (decision, _) = f.ask_bytes(&req);
        assert!(
            matches!(malformed(&decision), Some(Malformed::Decode(_))),
            "{decision:?}"
        );
    }

    #[test]
    fn oversized_and_response_messages() {
        let f = Fixture::new();
        let mut big = query("web.vm.", RecordType::A).to_vec().expect("encode");
        big.resize(5000, 0);
        let (decision, out) = f.ask_bytes(&big);
        assert!(
            matches!(malformed(&decision), Some(Malformed::TooLarge(5000))),
            "{decision:?}"
        );
        assert_eq!(
            Message::from_vec(&out)
                .expect("decode")
                .metadata
                .response_code,
            ResponseCode::FormErr
        );

        let mut response = query("web.vm.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        let bytes = response.to_vec().expect("encode");
        let (decision, out) = f.ask_bytes(&bytes);
        assert!(matches!(decision, Decision::Drop(Dropped::NotAQuery)));
        assert!(out.is_empty());
    }

    #[test]
    fn records_map_is_read_per_call() {
        let f = Fixture::new();
        f.records
            .replace_all(HashMap::from([("db", WEB)]))
            .expect("replace");
        let r = f.ask(&query("web.vm.", RecordType::A));
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = f.ask(&query("db.vm.", RecordType::A));
        assert_eq!(r.answers[0].data, RData::A(A(WEB)));
    }

    /// Our in-place decoder and hickory-server's (`Request::from_bytes`,
    /// what its `Server` used on UDP) agree on every message: the same
    /// request, or both fail.
    #[test]
    fn decode_matches_hickory_servers_decoder() {
        let from = SocketAddr::from((Ipv4Addr::LOCALHOST, 5353));
        let mut v1 = with_edns(query("web.vm.", RecordType::A));
        v1.edns.as_mut().expect("edns").set_version(1);
        let mut two = query("web.vm.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("db.vm.").expect("name"),
            RecordType::AAAA,
        ));
        let mut answers = query("web.vm.", RecordType::A);
        answers.add_answer(Record::from_rdata(
            Name::from_ascii("web.vm.").expect("name"),
            5,
            RData::A(A(WEB)),
        ));
        let samples: Vec<Vec<u8>> = [
            query("web.vm.", RecordType::A),
            query("WeB.Vm.", RecordType::AAAA),
            with_edns(query("example.com.", RecordType::MX)),
            v1,
            two,
            answers,
        ]
        .iter()
        .map(|m| m.to_vec().expect("encode"))
        .collect();
        let mut rng = StdRng::seed_from_u64(0xdec0de);
        let mut inputs = Vec::new();
        for sample in &samples {
            for len in 0..=sample.len() {
                inputs.push(sample[..len].to_vec());
            }
            for _ in 0..500 {
                let mut p = sample.clone();
                for _ in 0..rng.gen_range(1..=3) {
                    let at = rng.gen_range(0..p.len());
                    p[at] = rng.gen();
                }
                inputs.push(p);
            }
        }
        let (mut decoded, mut failed) = (0, 0);
        for raw in &inputs {
            match (
                decode(raw),
                Request::from_bytes(raw.clone(), from, Protocol::Udp),
            ) {
                (Ok(ours), Ok(theirs)) => {
                    assert_eq!(ours, *theirs, "{raw:?}");
                    decoded += 1;
                }
                (Err(_), Err(_)) => failed += 1,
                (ours, theirs) => panic!("{raw:?}: ours {ours:?}, hickory {:?}", theirs.err()),
            }
        }
        // Both kinds were exercised.
        assert!(
            decoded > 100 && failed > 100,
            "{decoded} decoded, {failed} failed"
        );
    }
}
