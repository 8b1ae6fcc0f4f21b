"""Where a client finds the kernel: the one rule, defined in vfmos_runtime.paths."""

from vfmos_runtime.paths import (KERNEL_SOCKET, SYSTEM_SOCKET, credentials_socket,
                                 default_data_dir, default_state_dir, kernel_socket)

__all__ = ["KERNEL_SOCKET", "SYSTEM_SOCKET", "credentials_socket", "default_data_dir",
           "default_state_dir", "kernel_socket"]
