"""Protocol constants of the VFMOS wire: one value each, shared by daemons and clients."""

from __future__ import annotations

# gRPC refuses larger messages with RESOURCE_EXHAUSTED, on every socket and in every client.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# A document is streamed to the kernel in parts of this size.
INGEST_PART_BYTES = 1 << 20

# Metadata a local client sends with its session ticket (from the credentials socket).
TICKET_HEADER = "x-vfm-ticket"
# Metadata the kernel sends to a service: its per-boot secret, handed out at registration.
KERNEL_SECRET_HEADER = "x-vfm-kernel"

# Limits every part checks the same way.
MAX_NEW_TOKENS = 4096
MAX_TENANT = 128
# Embed: texts per call, characters per text.
MAX_EMBED_TEXTS = 256
MAX_EMBED_CHARS = 32 * 1024

# The user-space services the kernel knows by name.
MODEL_SERVICE = "vfm-modeld"
DATA_SERVICE = "vfm-datad"
TRUST_SERVICE = "vfm-trustd"
KNOWN_SERVICES = (MODEL_SERVICE, DATA_SERVICE, TRUST_SERVICE)
