//! Request and response bodies of Firecracker's HTTP API, mirroring its
//! swagger contract (`src/firecracker/swagger/firecracker.yaml`) field for
//! field. Only the subset banger uses is modelled; every type denies
//! unknown fields, so a misspelt field fails here rather than as a 400
//! from Firecracker, and optional fields are left out when unset (the
//! API then applies its own default).
//!
//! Each PUT body knows its resource path ([`PutRequest`]); the client in
//! [`super::client`] sends them, and [`super::configure`] builds them from a
//! [`crate::MachineSpec`].

use serde::{Deserialize, Serialize};

/// A body that is PUT to one API resource.
pub trait PutRequest: Serialize {
    /// The resource path, e.g. `/drives/root`.
    fn path(&self) -> String;
}

/// `PUT /machine-config`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// 1..=32 (1 or even when SMT is on).
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
}

impl PutRequest for MachineConfiguration {
    fn path(&self) -> String {
        "/machine-config".into()
    }
}

/// `PUT /boot-source`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// An uncompressed ELF `vmlinux` (x86_64).
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

impl PutRequest for BootSource {
    fn path(&self) -> String {
        "/boot-source".into()
    }
}

/// `PUT /drives/{drive_id}` (a virtio-block drive).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Alphanumeric and `_` only (Firecracker's resource id rule).
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

impl PutRequest for Drive {
    fn path(&self) -> String {
        format!("/drives/{}", self.drive_id)
    }
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

impl PutRequest for NetworkInterface {
    fn path(&self) -> String {
        format!("/network-interfaces/{}", self.iface_id)
    }
}

/// `PUT /vsock`: a hybrid vsock device. Host-initiated connections go
/// through `uds_path` with a `CONNECT <port>\n` preamble.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// At least 3.
    pub guest_cid: u32,
    pub uds_path: String,
}

impl PutRequest for Vsock {
    fn path(&self) -> String {
        "/vsock".into()
    }
}

/// `PUT /logger`. The file at `log_path` must exist (Firecracker opens it
/// without creating it).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
}

impl PutRequest for Logger {
    fn path(&self) -> String {
        "/logger".into()
    }
}

/// The action of `PUT /actions`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionType {
    /// Boots the configured guest.
    InstanceStart,
    /// Presses Ctrl+Alt+Del on the guest's i8042 keyboard (x86): with
    /// `reboot=k` the guest reboots, and Firecracker exits.
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

impl PutRequest for InstanceActionInfo {
    fn path(&self) -> String {
        "/actions".into()
    }
}

/// `GET /`: the instance's description.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// The `--id` Firecracker was started with.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

impl InstanceInfo {
    /// The state in which the guest's vCPUs run.
    pub const RUNNING: &'static str = "Running";

    pub fn is_running(&self) -> bool {
        self.state == Self::RUNNING
    }
}

/// The body of every error response.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Error {
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn body<T: Serialize>(value: &T) -> serde_json::Value {
        serde_json::to_value(value).unwrap()
    }

    #[test]
    fn machine_configuration_body() {
        let mut mc = MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 512,
            smt: Some(false),
        };
        assert_eq!(
            body(&mc),
            json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false})
        );
        mc.smt = None;
        assert_eq!(body(&mc), json!({"vcpu_count": 2, "mem_size_mib": 512}));
        assert_eq!(mc.path(), "/machine-config");
    }

    #[test]
    fn boot_source_body() {
        let mut bs = BootSource {
            kernel_image_path: "/k/vmlinux".into(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: Some("/k/initrd".into()),
        };
        assert_eq!(
            body(&bs),
            json!({
                "kernel_image_path": "/k/vmlinux",
                "boot_args": "console=ttyS0",
                "initrd_path": "/k/initrd",
            })
        );
        bs.boot_args = None;
        bs.initrd_path = None;
        assert_eq!(body(&bs), json!({"kernel_image_path": "/k/vmlinux"}));
        assert_eq!(bs.path(), "/boot-source");
    }

    #[test]
    fn drive_body_and_path() {
        let d = Drive {
            drive_id: "root".into(),
            path_on_host: "/vms/a/root.ext4".into(),
            is_root_device: true,
            is_read_only: false,
        };
        assert_eq!(
            body(&d),
            json!({
                "drive_id": "root",
                "path_on_host": "/vms/a/root.ext4",
                "is_root_device": true,
                "is_read_only": false,
            })
        );
        assert_eq!(d.path(), "/drives/root");
    }

    #[test]
    fn network_interface_body_and_path() {
        let mut n = NetworkInterface {
            iface_id: "net0".into(),
            host_dev_name: "bg-tap0".into(),
            guest_mac: Some("02:00:00:00:00:01".into()),
        };
        assert_eq!(
            body(&n),
            json!({
                "iface_id": "net0",
                "host_dev_name": "bg-tap0",
                "guest_mac": "02:00:00:00:00:01",
            })
        );
        n.guest_mac = None;
        assert_eq!(
            body(&n),
            json!({"iface_id": "net0", "host_dev_name": "bg-tap0"})
        );
        assert_eq!(n.path(), "/network-interfaces/net0");
    }

    #[test]
    fn vsock_body() {
        let v = Vsock {
            guest_cid: 3,
            uds_path: "/run/v/vsock.sock".into(),
        };
        assert_eq!(
            body(&v),
            json!({"guest_cid": 3, "uds_path": "/run/v/vsock.sock"})
        );
        assert_eq!(v.path(), "/vsock");
    }

    #[test]
    fn logger_body() {
        let l = Logger {
            log_path: Some("/run/v/firecracker.log".into()),
            level: Some("Info".into()),
            show_level: Some(true),
            show_log_origin: Some(false),
        };
        assert_eq!(
            body(&l),
            json!({
                "log_path": "/run/v/firecracker.log",
                "level": "Info",
                "show_level": true,
                "show_log_origin": false,
            })
        );
        let empty = Logger {
            log_path: None,
            level: None,
            show_level: None,
            show_log_origin: None,
        };
        assert_eq!(body(&empty), json!({}));
        assert_eq!(l.path(), "/logger");
    }

    #[test]
    fn action_bodies() {
        for (action, name) in [
            (ActionType::InstanceStart, "InstanceStart"),
            (ActionType::SendCtrlAltDel, "SendCtrlAltDel"),
            (ActionType::FlushMetrics, "FlushMetrics"),
        ] {
            let a = InstanceActionInfo {
                action_type: action,
            };
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                format!(r#"{{"action_type":"{name}"}}"#)
            );
            assert_eq!(a.path(), "/actions");
        }
    }

    #[test]
    fn instance_info_parses_and_denies_unknown_fields() {
        let info: InstanceInfo = serde_json::from_str(
            r#"{"id":"vm-1","state":"Running","vmm_version":"1.7.0","app_name":"Firecracker"}"#,
        )
        .unwrap();
        assert_eq!(info.id, "vm-1");
        assert_eq!(info.vmm_version, "1.7.0");
        assert_eq!(info.app_name, "Firecracker");
        assert!(info.is_running());
        let not_started = InstanceInfo {
            state: "Not started".into(),
            ..info
        };
        assert!(!not_started.is_running());

        let err = serde_json::from_str::<InstanceInfo>(
            r#"{"id":"x","state":"Running","vmm_version":"1","app_name":"F","extra":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
        // A missing required field is refused too.
        assert!(serde_json::from_str::<InstanceInfo>(r#"{"id":"x","state":"Running"}"#).is_err());
    }

    #[test]
    fn error_body_parses_and_denies_unknown_fields() {
        let e: Error = serde_json::from_str(r#"{"fault_message":"bad drive"}"#).unwrap();
        assert_eq!(e.fault_message, "bad drive");
        assert!(serde_json::from_str::<Error>(r#"{"fault_message":"x","code":1}"#).is_err());
    }

    #[test]
    fn request_bodies_deny_unknown_fields_too() {
        assert!(serde_json::from_str::<Drive>(
            r#"{"drive_id":"a","path_on_host":"/x","is_root_device":true,"is_read_only":false,"partuuid":"p"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<MachineConfiguration>(
            r#"{"vcpu_count":1,"mem_size_mib":128,"ht_enabled":false}"#
        )
        .is_err());
        assert!(serde_json::from_str::<InstanceActionInfo>(
            r#"{"action_type":"InstanceStart","payload":{}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<InstanceActionInfo>(r#"{"action_type":"Reboot"}"#).is_err());
    }
}
