//! Bridge and TAP management through netlink, inside throw-away network
//! namespaces (see `common`). Needs root.

mod common;

use std::net::Ipv4Addr;

use banger_net::{stable_bridge_mac, Host, NetConfig, NetError};
use common::{in_netns, require_root, NetNs};

/// IPv4 addresses on `dev` in `ns`, as `ip` prints them ("172.30.0.1/24").
fn ipv4_addrs(ns: &NetNs, dev: &str) -> Vec<String> {
    let out = ns.ip(&["-o", "-4", "addr", "show", "dev", dev]);
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_owned)
        })
        .collect()
}

#[test]
fn bridge_is_created_up_with_one_address_and_ensure_is_idempotent() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("bridge");
    let (first, second) = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        let cfg = NetConfig::default();
        let first = host.ensure_bridge(&cfg).await.expect("first ensure");
        let second = host.ensure_bridge(&cfg).await.expect("second ensure");
        (first, second)
    });

    assert!(
        first.created && first.address_added && first.changed(),
        "{first:?}"
    );
    assert_eq!(first.address, Ipv4Addr::new(172, 30, 0, 1));
    assert_eq!(first.prefix_len, 24);
    assert!(first.other_addresses.is_empty());
    assert!(
        !second.changed(),
        "second call must change nothing: {second:?}"
    );
    assert_eq!(second.ifindex, first.ifindex);

    let details = ns.ip(&["-d", "link", "show", "banger0"]);
    assert!(details.contains("bridge"), "{details}");
    assert!(details.contains(",UP"), "bridge must be up: {details}");
    assert_eq!(ipv4_addrs(&ns, "banger0"), vec!["172.30.0.1/24".to_owned()]);
    assert_eq!(first.mac, Some(stable_bridge_mac("banger0")));

    // Ports joining (one with a MAC lower than the bridge's) and leaving do
    // not change the bridge's MAC: it is the guests' gateway MAC.
    ns.ip(&[
        "link",
        "add",
        "port0",
        "address",
        "02:00:00:00:00:01",
        "type",
        "veth",
        "peer",
        "name",
        "port0p",
    ]);
    ns.ip(&["link", "set", "port0", "master", "banger0", "up"]);
    ns.ip(&["link", "set", "port0p", "up"]);
    let mac = stable_bridge_mac("banger0").to_string();
    assert!(ns.ip(&["link", "show", "banger0"]).contains(&mac));
    ns.ip(&["link", "del", "port0"]);
    assert!(ns.ip(&["link", "show", "banger0"]).contains(&mac));

    // A bridge set down behind banger's back is set up again, and a foreign
    // address is reported but left alone.
    ns.ip(&["link", "set", "banger0", "down"]);
    ns.ip(&["addr", "add", "10.1.2.3/8", "dev", "banger0"]);
    let third = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        host.ensure_bridge(&NetConfig::default())
            .await
            .expect("third ensure")
    });
    assert!(
        third.set_up && !third.created && !third.address_added,
        "{third:?}"
    );
    assert_eq!(third.other_addresses, vec![(Ipv4Addr::new(10, 1, 2, 3), 8)]);
    let mut addrs = ipv4_addrs(&ns, "banger0");
    addrs.sort();
    assert_eq!(
        addrs,
        vec!["10.1.2.3/8".to_owned(), "172.30.0.1/24".to_owned()]
    );
}

#[test]
fn ensure_bridge_refuses_a_non_bridge_of_that_name() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("notbridge");
    ns.ip(&[
        "link", "add", "banger0", "type", "veth", "peer", "name", "peer0",
    ]);
    let err = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        host.ensure_bridge(&NetConfig::default())
            .await
            .expect_err("a veth is not a bridge")
    });
    assert!(
        matches!(&err, NetError::WrongKind { found, .. } if found == "veth"),
        "{err:?}"
    );
}

#[test]
fn tap_is_created_on_the_bridge_listed_and_deleted() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("tap");
    // Links that must not show up in a `bgtap` listing.
    ns.ip(&[
        "link", "add", "other0", "type", "veth", "peer", "name", "xbgtap0",
    ]);

    let (tap, tap2, listed, exists) = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        let cfg = NetConfig::default();
        host.ensure_bridge(&cfg).await.expect("bridge");
        let tap = host
            .create_tap("bgtap0", "banger0")
            .await
            .expect("create bgtap0");
        let tap2 = host
            .create_tap("bgtap1", "banger0")
            .await
            .expect("create bgtap1");
        let listed = host.list_links_with_prefix("bgtap").await.expect("list");
        let exists = host.link_exists("bgtap0").await.expect("exists");
        (tap, tap2, listed, exists)
    });

    assert_eq!(tap.name, "bgtap0");
    assert_ne!(tap.ifindex, 0);
    assert_ne!(tap.mac.0, [0; 6]);
    assert_ne!(tap.mac, tap2.mac);
    assert!(exists);

    let details = ns.ip(&["-d", "link", "show", "bgtap0"]);
    assert!(details.contains("master banger0"), "{details}");
    assert!(details.contains("tun type tap"), "{details}");
    assert!(details.contains("vnet_hdr on"), "{details}");
    assert!(details.contains("persist on"), "{details}");
    assert!(
        details.contains("<NO-CARRIER,BROADCAST,MULTICAST,UP>"),
        "{details}"
    );
    assert!(details.contains(&tap.mac.to_string()), "{details}");

    let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["bgtap0", "bgtap1"]);
    for link in &listed {
        assert_eq!(link.kind.as_deref(), Some("tun"), "{link:?}");
        assert_eq!(link.master.as_deref(), Some("banger0"), "{link:?}");
        assert!(link.up, "{link:?}");
    }

    let (deleted, again, tap_as_bridge, bridge_as_tap, left, exists_after) =
        in_netns(&ns, || async {
            let host = Host::connect().await.expect("connect");
            let deleted = host.delete_tap("bgtap0").await.expect("delete");
            let again = host.delete_link("bgtap0").await.expect("delete again");
            let tap_as_bridge = host
                .delete_bridge("bgtap1")
                .await
                .expect_err("bgtap1 is not a bridge");
            let bridge_as_tap = host
                .delete_tap("banger0")
                .await
                .expect_err("banger0 is not a TAP");
            let left = host.list_links_with_prefix("bgtap").await.expect("list");
            let exists_after = host.link_exists("bgtap0").await.expect("exists");
            (
                deleted,
                again,
                tap_as_bridge,
                bridge_as_tap,
                left,
                exists_after,
            )
        });
    assert!(deleted);
    assert!(!again, "deleting a missing link reports false");
    assert!(
        matches!(tap_as_bridge, NetError::WrongKind { .. }),
        "{tap_as_bridge:?}"
    );
    assert!(
        matches!(bridge_as_tap, NetError::WrongKind { .. }),
        "{bridge_as_tap:?}"
    );
    assert!(!exists_after);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].name, "bgtap1");
    assert!(!ns.ip(&["link", "show"]).contains(": bgtap0:"));

    // The bridge goes; its remaining TAP stays, detached.
    let (gone, gone_again, left) = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        let gone = host.delete_bridge("banger0").await.expect("delete bridge");
        let gone_again = host
            .delete_bridge("banger0")
            .await
            .expect("delete bridge again");
        let left = host.list_links_with_prefix("bgtap").await.expect("list");
        (gone, gone_again, left)
    });
    assert!(gone && !gone_again);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].master, None);
}

#[test]
fn tap_creation_errors_leave_nothing_behind() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("taperr");
    let (no_bridge, dup, bad_name, long_name, listed) = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        let no_bridge = host
            .create_tap("bgtap0", "banger0")
            .await
            .expect_err("no bridge yet");
        host.ensure_bridge(&NetConfig::default())
            .await
            .expect("bridge");
        host.create_tap("bgtap0", "banger0").await.expect("create");
        let dup = host
            .create_tap("bgtap0", "banger0")
            .await
            .expect_err("exists already");
        let bad_name = host
            .create_tap("../x", "banger0")
            .await
            .expect_err("bad name");
        let long_name = host
            .create_tap("bgtap0123456789a", "banger0")
            .await
            .expect_err("16 bytes");
        let listed = host.list_links_with_prefix("").await.expect("list");
        (no_bridge, dup, bad_name, long_name, listed)
    });
    assert!(
        matches!(&no_bridge, NetError::NotFound { kind: "bridge", name } if name == "banger0"),
        "{no_bridge:?}"
    );
    assert!(
        matches!(&dup, NetError::AlreadyExists { name } if name == "bgtap0"),
        "{dup:?}"
    );
    assert!(matches!(bad_name, NetError::InvalidName(_)), "{bad_name:?}");
    assert!(
        matches!(long_name, NetError::InvalidName(_)),
        "{long_name:?}"
    );
    let mut names: Vec<String> = listed.into_iter().map(|l| l.name).collect();
    names.sort();
    assert_eq!(names, ["banger0", "bgtap0", "lo"]);
}

#[test]
fn default_uplink_follows_the_default_route() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("uplink");
    let none = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        host.default_uplink().await.expect("route lookup")
    });
    assert_eq!(none, None, "a fresh namespace has no default route");

    for (dev, addr) in [("wan0", "10.50.0.1/24"), ("wan1", "10.51.0.1/24")] {
        let peer = format!("{dev}p");
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["link", "set", &peer, "up"]);
    }
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.50.0.254",
        "dev",
        "wan0",
        "metric",
        "200",
    ]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.51.0.254",
        "dev",
        "wan1",
        "metric",
        "100",
    ]);
    let uplink = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        host.default_uplink().await.expect("route lookup")
    });
    assert_eq!(uplink.as_deref(), Some("wan1"), "the lowest metric wins");
}

#[test]
fn tap_owner_and_group_let_an_unprivileged_vmm_attach() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("tapowner");
    let tap = in_netns(&ns, || async {
        let host = Host::connect().await.expect("connect");
        host.ensure_bridge(&NetConfig::default())
            .await
            .expect("bridge");
        let opts = banger_net::TapOptions {
            owner_uid: Some(65534),
            owner_gid: Some(65534),
        };
        host.create_tap_with("bgtap7", "banger0", &opts)
            .await
            .expect("create owned TAP")
    });
    assert_eq!(tap.name, "bgtap7");
    let details = ns.ip(&["-d", "link", "show", "bgtap7"]);
    // iproute2 prints names when they resolve, numbers otherwise.
    assert!(
        details.contains("user nobody") || details.contains("user 65534"),
        "{details}"
    );
    assert!(
        details.contains("group nogroup") || details.contains("group 65534"),
        "{details}"
    );
}
