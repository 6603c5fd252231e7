//! banger's nftables table and the ip_forward sysctl, inside throw-away
//! network namespaces (see `common`). Needs root and `nft`.
//!
//! Every `nft` run happens from a thread inside the test's namespace; the
//! first test proves that such a child really lands in that namespace, and
//! each NAT test re-checks it before touching nftables.

mod common;

use banger_net::{enable_ip_forward, ip_forward_enabled, NatRules, NetConfig};
use common::{
    child_netns_inode, host_ip_forward, in_netns_sync, require_root, thread_netns_inode, NetNs,
};
use serde_json::Value;

/// Panics unless the calling thread, and a child it spawns, run in the
/// namespace with inode `ns_inode`.
fn assert_children_in(ns_inode: u64) {
    assert_eq!(
        thread_netns_inode(),
        ns_inode,
        "thread is not in the test netns"
    );
    assert_eq!(
        child_netns_inode(),
        ns_inode,
        "a child process would not run in the test netns"
    );
}

#[test]
fn child_processes_inherit_the_threads_netns() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("inherit");
    let host_inode = std::fs::metadata("/proc/self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("stat host netns");
    assert_ne!(ns.inode(), host_inode);
    let (thread, child) = in_netns_sync(&ns, || (thread_netns_inode(), child_netns_inode()));
    assert_eq!(thread, ns.inode());
    assert_eq!(
        child,
        ns.inode(),
        "posix_spawn/fork must copy the calling thread's netns"
    );
    // And the main thread never moved.
    assert_eq!(child_netns_inode(), host_inode);
}

/// `nft -j list table ip <table>` run with `ip netns exec`, independent of
/// the library.
fn nft_list(ns: &NetNs, table: &str) -> Value {
    let out = ns.exec("nft", &["-j", "list", "table", "ip", table]);
    assert!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nft json")
}

/// The rules of `chain`, as compact JSON strings of their `expr`.
fn rules_of(listing: &Value, chain: &str) -> Vec<String> {
    listing["nftables"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["chain"] == chain)
        .map(|r| r["expr"].to_string())
        .collect()
}

/// A listing without handles (they change when the table is rebuilt).
fn without_handles(mut v: Value) -> Value {
    fn scrub(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("handle");
                m.values_mut().for_each(scrub);
            }
            Value::Array(a) => a.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    scrub(&mut v);
    v
}

#[test]
fn nat_table_is_applied_atomically_idempotently_and_removed() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("nat");
    let inode = ns.inode();
    let rules = NatRules::new(&NetConfig::default(), None);

    let r = rules.clone();
    let (before, applied_once) = in_netns_sync(&ns, move || {
        assert_children_in(inode);
        let before = NatRules::current("banger").expect("current");
        r.apply().expect("apply");
        (before, r.is_applied().expect("is_applied"))
    });
    assert_eq!(before, None);
    assert!(applied_once);

    let first = nft_list(&ns, "banger");
    let nat = rules_of(&first, "postrouting");
    assert_eq!(nat.len(), 1, "{nat:?}");
    assert!(
        nat[0].contains(r#"{"prefix":{"addr":"172.30.0.0","len":24}}"#),
        "{nat:?}"
    );
    assert!(
        nat[0].contains(r#""op":"!=""#) && nat[0].contains(r#""right":"banger0""#),
        "{nat:?}"
    );
    assert!(nat[0].contains(r#"{"masquerade":null}"#), "{nat:?}");
    let fwd = rules_of(&first, "forward");
    assert_eq!(fwd.len(), 2, "{fwd:?}");
    assert!(
        fwd[0].contains(r#""key":"iifname""#) && fwd[0].contains(r#"{"accept":null}"#),
        "{fwd:?}"
    );
    assert!(fwd[1].contains(r#"["established","related"]"#), "{fwd:?}");
    let text = String::from_utf8_lossy(&ns.exec("nft", &["list", "table", "ip", "banger"]).stdout)
        .into_owned();
    assert!(
        text.contains("type nat hook postrouting priority srcnat; policy accept;"),
        "{text}"
    );
    assert!(
        text.contains("type filter hook forward priority filter; policy accept;"),
        "{text}"
    );
    assert!(
        text.contains(r#"ip saddr 172.30.0.0/24 oifname != "banger0" counter"#),
        "{text}"
    );
    assert!(text.contains(r#"iifname "banger0" counter"#), "{text}");
    assert!(
        text.contains(r#"oifname "banger0" ct state established,related counter"#),
        "{text}"
    );

    // Drift: a stray rule in banger's table, and a table of someone else's.
    ns.exec("nft", &["add", "rule", "ip", "banger", "forward", "drop"]);
    ns.exec("nft", &["add", "table", "ip", "other"]);
    ns.exec("nft", &["add", "chain", "ip", "other", "c"]);
    let r = rules.clone();
    let (drifted, fixed) = in_netns_sync(&ns, move || {
        let drifted = !r.is_applied().expect("is_applied");
        r.apply().expect("second apply");
        r.apply().expect("third apply");
        (drifted, r.is_applied().expect("is_applied"))
    });
    assert!(drifted, "a stray rule must show as drift");
    assert!(fixed);
    let second = nft_list(&ns, "banger");
    assert_eq!(
        without_handles(second),
        without_handles(first),
        "re-applying must give exactly the same table"
    );

    // With a known uplink the masquerade rule names it.
    let pinned = NatRules::new(&NetConfig::default(), Some("eth7".to_owned()));
    in_netns_sync(&ns, move || pinned.apply().expect("apply pinned"));
    let nat = rules_of(&nft_list(&ns, "banger"), "postrouting");
    assert_eq!(nat.len(), 1);
    assert!(
        nat[0].contains(r#""op":"==""#) && nat[0].contains(r#""right":"eth7""#),
        "{nat:?}"
    );

    let (status, removed, removed_again, after) = in_netns_sync(&ns, || {
        let status = NatRules::current("banger").expect("current");
        let removed = NatRules::remove("banger").expect("remove");
        let removed_again = NatRules::remove("banger").expect("remove again");
        let after = NatRules::current("banger").expect("current after");
        (status, removed, removed_again, after)
    });
    let status = status.expect("table listed while present");
    assert!(status["nftables"].as_array().is_some_and(|a| a.len() > 3));
    assert!(removed && !removed_again);
    assert_eq!(after, None);
    let out = ns.exec("nft", &["-j", "list", "tables"]);
    let tables = String::from_utf8_lossy(&out.stdout);
    assert!(
        !tables.contains(r#""name": "banger""#) && !tables.contains(r#""name":"banger""#),
        "{tables}"
    );
    assert!(
        tables.contains("other"),
        "someone else's table must survive: {tables}"
    );
}

#[test]
fn a_failed_transaction_keeps_the_previous_table() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("nftatomic");
    let inode = ns.inode();
    let (failed, still_applied) = in_netns_sync(&ns, move || {
        assert_children_in(inode);
        let rules = NatRules::new(&NetConfig::default(), None);
        rules.apply().expect("apply");
        // The transaction apply() sends, with its last rule pointing at a
        // chain that does not exist: nft must reject all of it, including
        // the leading delete of the table.
        let mut tx = serde_json::to_value(rules.apply_transaction()).expect("json");
        let last = tx["nftables"].as_array().map_or(0, Vec::len) - 1;
        tx["nftables"][last]["add"]["rule"]["chain"] = Value::String("nosuchchain".into());
        let mut child = std::process::Command::new("nft")
            .args(["-j", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(tx.to_string().as_bytes()).expect("write");
        }
        let out = child.wait_with_output().expect("wait nft");
        (
            !out.status.success(),
            rules.is_applied().expect("is_applied"),
        )
    });
    assert!(failed, "the broken transaction must fail");
    assert!(
        still_applied,
        "a failed transaction must leave the previous table untouched"
    );
}

#[test]
fn ip_forward_is_enabled_in_the_namespace_only() {
    if !require_root() {
        return;
    }
    let host_before = host_ip_forward();
    let ns = NetNs::new("fwd");
    let (was_on, changed, now_on, changed_again) = in_netns_sync(&ns, || {
        let was_on = ip_forward_enabled().expect("read");
        let changed = enable_ip_forward().expect("enable");
        let now_on = ip_forward_enabled().expect("read");
        let changed_again = enable_ip_forward().expect("enable again");
        (was_on, changed, now_on, changed_again)
    });
    assert_eq!(changed, !was_on);
    assert!(now_on);
    assert!(!changed_again, "second call reports no change");
    let inside =
        String::from_utf8_lossy(&ns.exec("cat", &["/proc/sys/net/ipv4/ip_forward"]).stdout)
            .into_owned();
    assert_eq!(inside.trim(), "1");
    assert_eq!(
        host_ip_forward(),
        host_before,
        "the host's ip_forward must not change"
    );
}
