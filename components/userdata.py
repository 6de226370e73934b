"""EC2 user data for Batch hosts: install the Lustre client and mount FSx.

AWS Batch merges launch-template user data with its own, so it must be a MIME
multi-part document. The boundary is fixed so the same inputs always give the
same bytes (a random boundary would show a launch-template change on every
preview).
"""
from __future__ import annotations

import base64
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

BOUNDARY = "==CPB-USER-DATA-BOUNDARY=="


#: Attempts (with growing pauses) for the client install and the mount: at first boot the NAT route
#: or the package mirror can lag the instance by a few seconds.
ATTEMPTS = 5


def lustre_mount_script(dns_name: str, mount_name: str, mount_path: str, fstab: str = "/etc/fstab") -> str:
    """Shell script that installs the Lustre client (AL2023 or AL2) and mounts FSx at ``mount_path``.

    The mount goes into ``fstab`` too, so a reboot remounts it. A failed user-data script does not
    stop the ECS agent (it is only ordered after cloud-final), and Docker turns a missing host path
    into an empty folder, so a host that could not mount would run jobs against an empty /fsx and
    fail them as bad input. Install and mount are therefore retried, and if they still fail the
    host shuts itself down; the launch template makes that a termination, so Batch replaces it.
    """
    source = f"{dns_name}@tcp:/{mount_name}"
    return "\n".join([
        "#!/bin/bash",
        "# cpb: mount FSx for Lustre before the ECS agent starts any job.",
        "set -uo pipefail",
        "fail() {",
        f'  echo "cpb: $* - shutting down so Batch replaces this host rather than run jobs without {mount_path}" >&2',
        "  shutdown -h now",
        "  exit 1",
        "}",
        "retry() {",
        "  local attempt",
        f"  for attempt in $(seq 1 {ATTEMPTS}); do",
        '    "$@" && return 0',
        "    sleep $((attempt * 5))",
        "  done",
        "  return 1",
        "}",
        "if ! command -v mount.lustre >/dev/null 2>&1; then",
        "  if command -v amazon-linux-extras >/dev/null 2>&1; then",
        "    retry amazon-linux-extras install -y lustre || fail 'installing the Lustre client failed'",
        "  else",
        "    retry dnf install -y lustre-client || fail 'installing the Lustre client failed'",
        "  fi",
        "fi",
        f"mkdir -p {mount_path} || fail 'cannot create {mount_path}'",
        f"grep -q ' {mount_path} lustre ' {fstab} || "
        f"echo '{source} {mount_path} lustre defaults,relatime,flock,_netdev 0 0' >> {fstab}",
        f"mountpoint -q {mount_path} || retry mount {mount_path} || fail 'mounting {source} at {mount_path} failed'",
        f"mountpoint -q {mount_path} || fail '{mount_path} is not a mount point after mounting'",
        "",
    ])


def mime_user_data(script: str) -> str:
    """Wrap a shell script as the MIME multi-part user data Batch requires."""
    message = MIMEMultipart(boundary=BOUNDARY)
    part = MIMEText(script, "x-shellscript", "us-ascii")
    message.attach(part)
    return message.as_string()


def lustre_user_data_base64(dns_name: str, mount_name: str, mount_path: str) -> str:
    """Base64 user data for a launch template (what EC2 expects)."""
    text = mime_user_data(lustre_mount_script(dns_name, mount_name, mount_path))
    return base64.b64encode(text.encode("ascii")).decode("ascii")
