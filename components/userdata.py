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


def lustre_mount_script(dns_name: str, mount_name: str, mount_path: str) -> str:
    """Shell script that installs the Lustre client (AL2023 or AL2) and mounts FSx at ``mount_path``.

    The mount goes into /etc/fstab too, so a reboot remounts it; ``set -e``
    makes a failed mount fail the boot, so Batch never places a job on a host
    without /fsx.
    """
    source = f"{dns_name}@tcp:/{mount_name}"
    return "\n".join([
        "#!/bin/bash",
        "# cpb: mount FSx for Lustre before the ECS agent starts any job.",
        "set -euo pipefail",
        "if ! command -v mount.lustre >/dev/null 2>&1; then",
        "  if command -v amazon-linux-extras >/dev/null 2>&1; then amazon-linux-extras install -y lustre",
        "  else dnf install -y lustre-client; fi",
        "fi",
        f"mkdir -p {mount_path}",
        f"grep -q ' {mount_path} lustre ' /etc/fstab || "
        f"echo '{source} {mount_path} lustre defaults,relatime,flock,_netdev 0 0' >> /etc/fstab",
        f"mountpoint -q {mount_path} || mount {mount_path}",
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
