//! One request message in, at most one response message out. Pure and
//! synchronous: the transports (`server.rs`) own the sockets, this module
//! owns what is answered how (see `docs/dns.md`).
//!
//! The question is echoed exactly as it arrived (case included, for
//! clients that use the 0x20 bit), and answer records carry the question's
//! name, so `WeB.Vm.` gets `WeB.Vm. A …`.

use std::iter;

use hickory_proto::op::{
    emit_message_parts, Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query,
    ResponseCode,
};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder, DecodeError,
};

use crate::name::query_key;
use crate::records::{Lookup, Snapshot, Zone};

/// Largest UDP response we offer through EDNS (the DNS Flag Day 2020 size:
/// no IP fragmentation on any sane path).
pub(crate) const SERVER_UDP_PAYLOAD: u16 = 1232;
/// Without EDNS a UDP response may not exceed 512 bytes.
const PLAIN_UDP_PAYLOAD: u16 = 512;
/// A DNS header's size; anything shorter gets no response.
pub(crate) const HEADER_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What became of one request.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The response is in the output buffer.
    Answered(ResponseCode),
    /// A FORMERR is in the output buffer.
    Malformed(Malformed),
    /// Send nothing.
    Dropped(Dropped),
}

/// Why a request got FORMERR.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("request is {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("request has {0} questions, not 1")]
    QuestionCount(u16),
    #[error("query carries answer or authority records")]
    RecordsInQuery,
    #[error("cannot decode request")]
    Decode(#[source] DecodeError),
}

/// Why a request got no response at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Shorter than a header: nothing to answer to.
    TooShort(usize),
    /// The QR bit says it is a response; answering could start a loop
    /// between two servers or reflect traffic.
    NotAQuery,
    /// The response could not be encoded (should not happen).
    Unencodable,
}

/// Everything a response needs besides the request bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    pub(crate) zone: &'a Zone,
    pub(crate) records: &'a Snapshot,
    pub(crate) max_request: usize,
    pub(crate) transport: Transport,
}

/// A response in the making.
struct Reply<'r> {
    meta: Metadata,
    query: Option<&'r Query>,
    answers: [Option<&'r Record>; 2],
    authority: Option<&'r Record>,
    edns: Option<Edns>,
    max_size: u16,
}

impl Reply<'_> {
    fn emit(&self, out: &mut Vec<u8>) -> Result<(), hickory_proto::ProtoError> {
        out.clear();
        let mut encoder = BinEncoder::new(out);
        encoder.set_max_size(self.max_size);
        emit_message_parts(
            &self.meta,
            &mut self.query.into_iter(),
            &mut self.answers.iter().filter_map(|r| *r),
            &mut self.authority.into_iter(),
            &mut iter::empty::<&Record>(),
            self.edns.as_ref(),
            None,
            &mut encoder,
        )?;
        Ok(())
    }

    /// Writes the reply, falling back to a bare SERVFAIL header if it cannot
    /// be encoded.
    fn finish(mut self, out: &mut Vec<u8>, outcome: Outcome) -> Outcome {
        if self.emit(out).is_ok() {
            return outcome;
        }
        self.meta.response_code = ResponseCode::ServFail;
        let header = Header {
            metadata: self.meta,
            counts: HeaderCounts::default(),
        };
        out.clear();
        match header.emit(&mut BinEncoder::new(out)) {
            Ok(()) => Outcome::Answered(ResponseCode::ServFail),
            Err(_) => Outcome::Dropped(Dropped::Unencodable),
        }
    }
}

/// FORMERR for a request too large to read (TCP: only its header was
/// read). `header` holds at least the first 12 bytes of the request.
pub(crate) fn too_large(
    header: &[u8],
    size: usize,
    transport: Transport,
    out: &mut Vec<u8>,
) -> Outcome {
    out.clear();
    let Ok(header) = Header::read(&mut BinDecoder::new(header)) else {
        return Outcome::Dropped(Dropped::TooShort(header.len()));
    };
    if header.metadata.message_type == MessageType::Response {
        return Outcome::Dropped(Dropped::NotAQuery);
    }
    let mut meta = Metadata::response_from_request(&header.metadata);
    meta.response_code = ResponseCode::FormErr;
    let reply = Reply {
        meta,
        query: None,
        answers: [None, None],
        authority: None,
        edns: None,
        max_size: match transport {
            Transport::Udp => PLAIN_UDP_PAYLOAD,
            Transport::Tcp => u16::MAX,
        },
    };
    reply.finish(out, Outcome::Malformed(Malformed::TooLarge(size)))
}

/// Answers `request` into `out` (cleared first).
pub(crate) fn respond(cx: &Context<'_>, request: &[u8], out: &mut Vec<u8>) -> Outcome {
    out.clear();
    if request.len() < HEADER_LEN {
        return Outcome::Dropped(Dropped::TooShort(request.len()));
    }
    let mut decoder = BinDecoder::new(request);
    let Ok(header) = Header::read(&mut decoder) else {
        return Outcome::Dropped(Dropped::TooShort(request.len()));
    };
    if header.metadata.message_type == MessageType::Response {
        return Outcome::Dropped(Dropped::NotAQuery);
    }
    if request.len() > cx.max_request {
        return too_large(request, request.len(), cx.transport, out);
    }
    let mut reply = Reply {
        meta: Metadata::response_from_request(&header.metadata),
        query: None,
        answers: [None, None],
        authority: None,
        edns: None,
        max_size: match cx.transport {
            Transport::Udp => PLAIN_UDP_PAYLOAD,
            Transport::Tcp => u16::MAX,
        },
    };
    let formerr = |mut reply: Reply<'_>, why: Malformed, out: &mut Vec<u8>| {
        reply.meta.response_code = ResponseCode::FormErr;
        reply.finish(out, Outcome::Malformed(why))
    };

    if header.metadata.op_code != OpCode::Query {
        reply.meta.response_code = ResponseCode::NotImp;
        return reply.finish(out, Outcome::Answered(ResponseCode::NotImp));
    }
    if header.counts.queries != 1 {
        return formerr(reply, Malformed::QuestionCount(header.counts.queries), out);
    }
    let query = match Query::read(&mut decoder) {
        Ok(query) => query,
        Err(e) => return formerr(reply, Malformed::Decode(e), out),
    };
    reply.query = Some(&query);
    if header.counts.answers != 0 || header.counts.authorities != 0 {
        return formerr(reply, Malformed::RecordsInQuery, out);
    }
    let additionals = usize::from(header.counts.additionals);
    let edns = match Message::read_records(&mut decoder, additionals, true, OpCode::Query) {
        Ok((_, edns, _)) => edns,
        Err(e) => return formerr(reply, Malformed::Decode(e), out),
    };

    if let Some(theirs) = &edns {
        let mut ours = Edns::new();
        ours.set_max_payload(SERVER_UDP_PAYLOAD);
        reply.edns = Some(ours);
        if cx.transport == Transport::Udp {
            reply.max_size = theirs
                .max_payload()
                .clamp(PLAIN_UDP_PAYLOAD, SERVER_UDP_PAYLOAD);
        }
        if theirs.version() > 0 {
            // RFC 6891 §6.1.3: we speak version 0 only.
            reply.meta.response_code = ResponseCode::BADVERS;
            return reply.finish(out, Outcome::Answered(ResponseCode::BADVERS));
        }
    }

    let in_zone = matches!(query.query_class, DNSClass::IN | DNSClass::ANY)
        .then(|| cx.zone.name.relative_len(&query.name))
        .flatten();
    let Some(relative) = in_zone else {
        reply.meta.response_code = ResponseCode::Refused;
        return reply.finish(out, Outcome::Answered(ResponseCode::Refused));
    };
    if matches!(query.query_type, RecordType::AXFR | RecordType::IXFR) {
        reply.meta.response_code = ResponseCode::Refused;
        return reply.finish(out, Outcome::Answered(ResponseCode::Refused));
    }
    reply.meta.authoritative = true;

    let soa = &cx.records.soa;
    let address;
    if relative == 0 {
        match query.query_type {
            RecordType::SOA => reply.answers[0] = Some(soa),
            RecordType::NS => reply.answers[0] = Some(&cx.zone.ns),
            RecordType::ANY => reply.answers = [Some(soa), Some(&cx.zone.ns)],
            _ => reply.authority = Some(soa),
        }
    } else {
        let mut buf = [0u8; 256];
        let found = match query_key(&query.name, relative, &mut buf) {
            Some(key) => cx.records.lookup(key),
            None => Lookup::Missing,
        };
        match found {
            Lookup::Address(ip) if matches!(query.query_type, RecordType::A | RecordType::ANY) => {
                address = Record::from_rdata(query.name.clone(), cx.zone.ttl, RData::A(A(ip)));
                reply.answers[0] = Some(&address);
            }
            Lookup::Address(_) | Lookup::EmptyNonTerminal => reply.authority = Some(soa),
            Lookup::Missing => {
                reply.meta.response_code = ResponseCode::NXDomain;
                reply.authority = Some(soa);
            }
        }
    }
    let code = reply.meta.response_code;
    reply.finish(out, Outcome::Answered(code))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use hickory_proto::rr::rdata::NS;
    use hickory_proto::rr::Name;

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

        fn ask_bytes(&self, request: &[u8], transport: Transport) -> (Outcome, Vec<u8>) {
            let snapshot = self.records.subscribe().borrow().clone();
            let cx = Context {
                zone: &self.zone,
                records: &snapshot,
                max_request: 4096,
                transport,
            };
            let mut out = Vec::new();
            let outcome = respond(&cx, request, &mut out);
            (outcome, out)
        }

        fn ask(&self, request: &Message) -> Message {
            let bytes = request.to_vec().expect("encode request");
            let (outcome, out) = self.ask_bytes(&bytes, Transport::Udp);
            assert!(!matches!(outcome, Outcome::Dropped(_)), "{outcome:?}");
            let response = Message::from_vec(&out).expect("decode response");
            assert_eq!(response.metadata.id, request.metadata.id);
            assert_eq!(response.metadata.message_type, MessageType::Response);
            response
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
            let (outcome, out) = f.ask_bytes(&full[..len], Transport::Udp);
            if len < HEADER_LEN {
                assert!(
                    matches!(outcome, Outcome::Dropped(Dropped::TooShort(_))),
                    "{len}"
                );
                assert!(out.is_empty());
            } else {
                assert!(
                    matches!(outcome, Outcome::Malformed(_)),
                    "{len}: {outcome:?}"
                );
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
        let (outcome, out) = f.ask_bytes(&req, Transport::Udp);
        assert!(
            matches!(outcome, Outcome::Malformed(Malformed::Decode(_))),
            "{outcome:?}"
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
        let (outcome, _) = f.ask_bytes(&req, Transport::Udp);
        assert!(
            matches!(outcome, Outcome::Malformed(Malformed::Decode(_))),
            "{outcome:?}"
        );
    }

    #[test]
    fn oversized_and_response_messages() {
        let f = Fixture::new();
        let mut big = query("web.vm.", RecordType::A).to_vec().expect("encode");
        big.resize(5000, 0);
        let (outcome, out) = f.ask_bytes(&big, Transport::Udp);
        assert!(
            matches!(outcome, Outcome::Malformed(Malformed::TooLarge(5000))),
            "{outcome:?}"
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
        let (outcome, out) = f.ask_bytes(&bytes, Transport::Udp);
        assert!(matches!(outcome, Outcome::Dropped(Dropped::NotAQuery)));
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
}
