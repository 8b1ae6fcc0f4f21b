"""libvfm: the typed client (sync and asyncio) for VFMOS syscalls."""

from libvfm.client import AsyncClient, Client
from vfmos_runtime.errors import VfmError
from libvfm.types import (AskResult, DaemonStatus, Identity, Process, ProcessSpec, Quota,
                          RoutePolicy, TokenLimits, Usage)

__all__ = ["AsyncClient", "AskResult", "Client", "DaemonStatus", "Identity", "Process",
           "ProcessSpec", "Quota", "RoutePolicy", "TokenLimits", "Usage", "VfmError"]
