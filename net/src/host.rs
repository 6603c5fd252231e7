//! [`Host`]: banger's links on the host, over one rtnetlink connection. The
//! daemon's `TapPool` actor owns a `Host` and calls it to reconcile the bridge
//! at start-up, to fill its pool of TAPs and to delete TAPs and leftovers.
//!
//! Every operation is idempotent or says precisely what already existed, so
//! the actor can repeat a reconcile after a crash. Nothing here shells out:
//! links and addresses go through netlink, TAP creation through
//! `/dev/net/tun` ([`crate::tun`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkUnspec, RouteMessageBuilder};
use tracing::instrument;

use crate::config::NetConfig;
use crate::error::{netlink_errno, NetError};
use crate::ifname::validate_ifname;
use crate::tun::{self, MacAddr, TapOptions};

/// One rtnetlink connection, bound to the network namespace of the thread
/// that called [`Host::connect`]. Cheap to clone (the handle is shared).
#[derive(Debug, Clone)]
pub struct Host {
    handle: rtnetlink::Handle,
}

/// What [`Host::ensure_bridge`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeState {
    pub name: String,
    pub ifindex: u32,
    pub mac: Option<MacAddr>,
    /// The host's address on the bridge, the guests' gateway.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The bridge did not exist and was created.
    pub created: bool,
    /// The bridge was down and was set up.
    pub set_up: bool,
    /// The host address was missing and was added.
    pub address_added: bool,
    /// Other IPv4 addresses on the bridge, left alone (someone else's, or a
    /// previous subnet's); worth a warning in `network status`.
    pub other_addresses: Vec<(Ipv4Addr, u8)>,
}

impl BridgeState {
    /// Whether the call changed anything on the host.
    pub fn changed(&self) -> bool {
        self.created || self.set_up || self.address_added
    }
}

/// A TAP made by [`Host::create_tap`]: attached to its bridge and up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapInfo {
    pub name: String,
    pub ifindex: u32,
    pub mac: MacAddr,
}

/// One link as listed by [`Host::list_links_with_prefix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    /// The rtnetlink kind (`"tun"`, `"bridge"`, `"veth"`, ...); `None` for
    /// links without one (a physical NIC, `lo`).
    pub kind: Option<String>,
    /// The bridge (or bond) it is enslaved to, by name.
    pub master: Option<String>,
    /// Administratively up (`IFF_UP`). A TAP nobody has opened is up but has
    /// no carrier; that is normal for a warm-pool TAP.
    pub up: bool,
    pub mac: Option<MacAddr>,
}

/// A link message reduced to what banger reads.
struct Link {
    index: u32,
    name: String,
    kind: Option<InfoKind>,
    master: Option<u32>,
    up: bool,
    mac: Option<MacAddr>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            master: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            mac: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Controller(index) if *index != 0 => link.master = Some(*index),
                LinkAttribute::Address(bytes) => link.mac = MacAddr::from_slice(bytes),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let NlLinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    fn kind_name(&self) -> String {
        self.kind
            .as_ref()
            .map_or_else(|| "device".to_owned(), ToString::to_string)
    }
}

impl Host {
    /// Opens a netlink connection in the calling thread's network namespace
    /// and spawns its driver on the current tokio runtime. The driver ends
    /// when the last clone of the `Host` is dropped.
    pub async fn connect() -> Result<Host, NetError> {
        let (connection, handle, _messages) =
            rtnetlink::new_connection().map_err(NetError::Connect)?;
        tokio::spawn(connection);
        Ok(Host { handle })
    }

    /// The underlying rtnetlink handle, for callers (and tests) that need an
    /// operation this type does not offer.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    async fn get_link(&self, name: &str) -> Result<Option<Link>, NetError> {
        validate_ifname(name)?;
        let mut stream = self.handle.link().get().match_name(name).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(NetError::Netlink {
                op: "get link",
                link: name.to_owned(),
                source,
            }),
        }
    }

    async fn all_links(&self) -> Result<Vec<Link>, NetError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Netlink {
                op: "list links",
                link: String::new(),
                source,
            })?;
        Ok(messages.iter().map(Link::from_message).collect())
    }

    async fn get_bridge(&self, name: &str) -> Result<Link, NetError> {
        let link = self
            .get_link(name)
            .await?
            .ok_or_else(|| NetError::NotFound {
                kind: "bridge",
                name: name.to_owned(),
            })?;
        if link.kind != Some(InfoKind::Bridge) {
            return Err(NetError::WrongKind {
                name: name.to_owned(),
                expected: "bridge",
                found: link.kind_name(),
            });
        }
        Ok(link)
    }

    async fn set_up(&self, index: u32, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                op: "set up",
                link: name.to_owned(),
                source,
            })
    }

    async fn ipv4_addresses(
        &self,
        index: u32,
        name: &str,
    ) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Netlink {
                op: "list addresses of",
                link: name.to_owned(),
                source,
            })?;
        let mut out = Vec::new();
        for msg in messages
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
        {
            // For IPv4, IFA_LOCAL is the interface's own address; IFA_ADDRESS
            // differs only on point-to-point links.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(address) {
                out.push((ip, msg.header.prefix_len));
            }
        }
        Ok(out)
    }

    /// Makes the bridge `cfg.bridge` exist, be up and carry the host address
    /// (the subnet's first host address, `172.30.0.1/24` by default) exactly
    /// once. Creates only what is missing; a second call changes nothing.
    /// Other addresses on the bridge are reported, not removed. Fails if an
    /// interface of that name exists but is not a bridge.
    #[instrument(skip_all, fields(bridge = %cfg.bridge, subnet = %cfg.subnet))]
    pub async fn ensure_bridge(&self, cfg: &NetConfig) -> Result<BridgeState, NetError> {
        cfg.validate()?;
        let name = cfg.bridge.as_str();
        let address = cfg
            .subnet
            .first_host()
            .ok_or(crate::ConfigError::SubnetTooSmall { subnet: cfg.subnet })?;
        let prefix_len = cfg.subnet.prefix();

        let mut created = false;
        if self.get_link(name).await?.is_none() {
            // LinkBridge::new sets IFF_UP too. STP stays off (the kernel's
            // default), so new ports forward at once. An explicit MAC stops
            // the kernel from re-deriving the bridge's MAC from its ports as
            // TAPs come and go, which would change the guests' gateway MAC.
            let mac = stable_bridge_mac(name);
            let msg = LinkBridge::new(name).address(mac.0.to_vec()).build();
            match self.handle.link().add(msg).execute().await {
                Ok(()) => {
                    created = true;
                    tracing::info!(bridge = name, "created bridge");
                }
                // Someone created it between our look-up and our add.
                Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(NetError::Netlink {
                        op: "create bridge",
                        link: name.to_owned(),
                        source,
                    })
                }
            }
        }
        let bridge = self.get_bridge(name).await?;

        let set_up = !bridge.up;
        if set_up {
            self.set_up(bridge.index, name).await?;
            tracing::info!(bridge = name, "set bridge up");
        }

        let existing = self.ipv4_addresses(bridge.index, name).await?;
        let address_added = !existing.contains(&(address, prefix_len));
        if address_added {
            match self
                .handle
                .address()
                .add(bridge.index, IpAddr::V4(address), prefix_len)
                .execute()
                .await
            {
                Ok(()) => {
                    tracing::info!(bridge = name, %address, prefix_len, "added host address to bridge")
                }
                Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(NetError::Netlink {
                        op: "add address to",
                        link: name.to_owned(),
                        source,
                    })
                }
            }
        }
        let other_addresses: Vec<(Ipv4Addr, u8)> = existing
            .into_iter()
            .filter(|a| *a != (address, prefix_len))
            .collect();
        if !other_addresses.is_empty() {
            tracing::warn!(bridge = name, others = ?other_addresses, "bridge carries other IPv4 addresses");
        }

        Ok(BridgeState {
            name: name.to_owned(),
            ifindex: bridge.index,
            mac: bridge.mac,
            address,
            prefix_len,
            created,
            set_up,
            address_added,
            other_addresses,
        })
    }

    /// Creates the persistent TAP `name`, attaches it to `bridge` and sets it
    /// up, with the default [`TapOptions`] (only root may attach).
    pub async fn create_tap(&self, name: &str, bridge: &str) -> Result<TapInfo, NetError> {
        self.create_tap_with(name, bridge, &TapOptions::default())
            .await
    }

    /// Creates the persistent TAP `name` (flags `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, single queue, owner and group from `opts`), attaches it
    /// to `bridge` and sets it up. Fails with [`NetError::AlreadyExists`] if
    /// an interface of that name exists, and with [`NetError::NotFound`] /
    /// [`NetError::WrongKind`] if `bridge` is missing or not a bridge. On
    /// failure after creation the TAP is deleted again.
    #[instrument(skip_all, fields(tap = %name, bridge = %bridge))]
    pub async fn create_tap_with(
        &self,
        name: &str,
        bridge: &str,
        opts: &TapOptions,
    ) -> Result<TapInfo, NetError> {
        validate_ifname(name)?;
        let br = self.get_bridge(bridge).await?;
        tun::create_persistent_tap(name, opts)?;
        match self.attach_tap(name, br.index).await {
            Ok(info) => {
                tracing::info!(tap = name, bridge, ifindex = info.ifindex, mac = %info.mac, "created TAP");
                Ok(info)
            }
            Err(e) => {
                if let Err(cleanup) = self.delete_link(name).await {
                    tracing::error!(tap = name, error = %cleanup, "could not delete half-made TAP");
                }
                Err(e)
            }
        }
    }

    /// Puts an existing TAP (back) on `bridge` and sets it up, e.g. one a
    /// crash left detached.
    pub async fn reattach_tap(&self, name: &str, bridge: &str) -> Result<TapInfo, NetError> {
        validate_ifname(name)?;
        let bridge_link = self
            .get_link(bridge)
            .await?
            .ok_or_else(|| NetError::NotFound {
                kind: "bridge",
                name: bridge.to_owned(),
            })?;
        self.attach_tap(name, bridge_link.index).await
    }

    async fn attach_tap(&self, name: &str, bridge_index: u32) -> Result<TapInfo, NetError> {
        let link = self
            .get_link(name)
            .await?
            .ok_or_else(|| NetError::NotFound {
                kind: "TAP",
                name: name.to_owned(),
            })?;
        // Master and IFF_UP in one RTM_SETLINK, as `ip link set X master B up`.
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.index)
                    .controller(bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                op: "attach to bridge and set up",
                link: name.to_owned(),
                source,
            })?;
        Ok(TapInfo {
            name: name.to_owned(),
            ifindex: link.index,
            mac: link.mac.unwrap_or_default(),
        })
    }

    /// Deletes the link `name`, whatever its kind. Returns `false` if it did
    /// not exist.
    #[instrument(skip_all, fields(link = %name))]
    pub async fn delete_link(&self, name: &str) -> Result<bool, NetError> {
        let Some(link) = self.get_link(name).await? else {
            return Ok(false);
        };
        self.delete_index(link.index, name).await
    }

    async fn delete_index(&self, index: u32, name: &str) -> Result<bool, NetError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => {
                tracing::info!(link = name, "deleted link");
                Ok(true)
            }
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(source) => Err(NetError::Netlink {
                op: "delete",
                link: name.to_owned(),
                source,
            }),
        }
    }

    async fn delete_of_kind(
        &self,
        name: &str,
        kind: InfoKind,
        expected: &'static str,
    ) -> Result<bool, NetError> {
        let Some(link) = self.get_link(name).await? else {
            return Ok(false);
        };
        if link.kind != Some(kind) {
            return Err(NetError::WrongKind {
                name: name.to_owned(),
                expected,
                found: link.kind_name(),
            });
        }
        self.delete_index(link.index, name).await
    }

    /// Deletes the TAP `name`; refuses (with [`NetError::WrongKind`]) to
    /// delete anything that is not a TUN/TAP device. Returns `false` if it
    /// did not exist. Deleting a TAP that a VMM still holds open removes it
    /// from the host at once; the VMM sees its queue fail.
    #[instrument(skip_all, fields(tap = %name))]
    pub async fn delete_tap(&self, name: &str) -> Result<bool, NetError> {
        self.delete_of_kind(name, InfoKind::Tun, "TAP").await
    }

    /// Deletes the bridge `name`; refuses to delete anything that is not a
    /// bridge. Its ports (TAPs) stay, detached. Returns `false` if it did not
    /// exist.
    #[instrument(skip_all, fields(bridge = %name))]
    pub async fn delete_bridge(&self, name: &str) -> Result<bool, NetError> {
        self.delete_of_kind(name, InfoKind::Bridge, "bridge").await
    }

    /// Whether a link called `name` exists.
    pub async fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        Ok(self.get_link(name).await?.is_some())
    }

    /// The link called `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        let Some(link) = self.get_link(name).await? else {
            return Ok(None);
        };
        let master = match link.master {
            Some(index) => self
                .all_links()
                .await?
                .into_iter()
                .find(|l| l.index == index)
                .map(|l| l.name),
            None => None,
        };
        Ok(Some(LinkInfo {
            name: link.name.clone(),
            ifindex: link.index,
            kind: link.kind.as_ref().map(ToString::to_string),
            master,
            up: link.up,
            mac: link.mac,
        }))
    }

    /// Every link whose name starts with `prefix`, sorted by name (the
    /// start-up reconcile lists `bgtap*` to find leftover TAPs). An empty
    /// prefix lists every link.
    pub async fn list_links_with_prefix(&self, prefix: &str) -> Result<Vec<LinkInfo>, NetError> {
        let links = self.all_links().await?;
        let names: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
        let mut out: Vec<LinkInfo> = links
            .iter()
            .filter(|l| l.name.starts_with(prefix))
            .map(|l| LinkInfo {
                name: l.name.clone(),
                ifindex: l.index,
                kind: l.kind.as_ref().map(ToString::to_string),
                master: l
                    .master
                    .and_then(|i| names.get(&i))
                    .map(|n| (*n).to_owned()),
                up: l.up,
                mac: l.mac,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The interface of the IPv4 default route in the main table (the one
    /// with the lowest metric if there are several; the first next hop of a
    /// multipath route), or `None` if there is no default route. The NAT
    /// rules masquerade out of this interface when it is known.
    pub async fn default_uplink(&self) -> Result<Option<String>, NetError> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetError::Netlink {
                op: "list routes",
                link: String::new(),
                source,
            })?;
        let Some(index) = pick_default_route(&routes) else {
            return Ok(None);
        };
        Ok(self
            .all_links()
            .await?
            .into_iter()
            .find(|l| l.index == index)
            .map(|l| l.name))
    }
}

/// The MAC banger gives a bridge it creates: locally administered, unicast,
/// `02:62:67` ("bg") followed by 24 bits of an FNV-1a hash of the name, so
/// it is the same every time the bridge is re-created.
pub fn stable_bridge_mac(name: &str) -> MacAddr {
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [_, a, b, c] = hash.to_be_bytes();
    MacAddr([0x02, 0x62, 0x67, a, b, c])
}

/// The output interface of the best IPv4 default route in the main table.
fn pick_default_route(routes: &[RouteMessage]) -> Option<u32> {
    routes
        .iter()
        .filter(|r| r.header.address_family == AddressFamily::Inet)
        .filter(|r| r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast)
        .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter(|r| {
            // A default route has no destination, or 0.0.0.0.
            r.attributes.iter().all(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => ip.is_unspecified(),
                _ => true,
            })
        })
        .filter_map(|r| {
            let metric = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Priority(p) => Some(*p),
                    _ => None,
                })
                .unwrap_or(0);
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
                _ => None,
            })?;
            Some((metric, oif))
        })
        .min()
        .map(|(_, oif)| oif)
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteNextHop;

    fn route(prefix: u8, table: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        msg.header.destination_prefix_length = prefix;
        msg.header.table = table;
        msg.header.kind = RouteType::Unicast;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn stable_bridge_mac_is_local_unicast_and_deterministic() {
        let mac = stable_bridge_mac("banger0");
        assert_eq!(mac, stable_bridge_mac("banger0"));
        assert_ne!(mac, stable_bridge_mac("banger1"));
        assert_eq!(mac.0[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(&mac.0[..3], &[0x02, 0x62, 0x67]);
    }

    #[test]
    fn picks_the_lowest_metric_default_route_in_main() {
        let routes = vec![
            route(24, 254, vec![RouteAttribute::Oif(7)]),
            route(
                0,
                254,
                vec![RouteAttribute::Oif(3), RouteAttribute::Priority(600)],
            ),
            route(
                0,
                254,
                vec![RouteAttribute::Oif(2), RouteAttribute::Priority(100)],
            ),
            route(0, 100, vec![RouteAttribute::Oif(9)]),
        ];
        assert_eq!(pick_default_route(&routes), Some(2));
    }

    #[test]
    fn multipath_uses_the_first_hop_and_none_without_default() {
        let mut hop = RouteNextHop::default();
        hop.interface_index = 5;
        let routes = vec![route(0, 254, vec![RouteAttribute::MultiPath(vec![hop])])];
        assert_eq!(pick_default_route(&routes), Some(5));
        assert_eq!(
            pick_default_route(&[route(8, 254, vec![RouteAttribute::Oif(1)])]),
            None
        );
        assert_eq!(pick_default_route(&[]), None);
    }
}
